"""A compact PyTorch Align2Gen (D2R-Net) visual side written from align2gen_spec.md §3, §4, §6.3, §13.1, with the
OFFICIAL module / attribute names (state_dict keys of ``align.visual_extractor.*``). Test-only.

* ``VisualExtractor``: ``model`` = ``nn.Sequential(*list(resnet.children())[:-2])`` (keys ``model.0`` conv1,
  ``model.1`` bn1, ``model.4..7`` layer1..4), ``cpca`` = CPCA(C, C), ``local_embedder`` = bias-free 1×1 conv;
  returns (patch_feats (B, h·w, d_e), avg_feats (B, d_e)).
* ``SimpleConvNet`` (``conv1..5``, ``bn1..5``), ``PPA(in_features, filters)`` (HCF-Net, the [HYP] LERA stand-in:
  ``skip``, ``c1..c3``, ``sa``, ``cn``, ``lga2``, ``lga4``, ``bn1``, ``drop``).
* ``MultiTargetExtractor``: ``simple``, ``visual_extractor``, ``region_visual_extractor``; the region loop at batch
  size 1 with the exact-1e-8 placeholder test (every BN updates its running statistics once per valid region).
* ``naaf_similarity`` / ``scan_similarity``: the [RECON] fragment scores of §6.3 for one pair, written literally
  (no masks; pass the valid rows only).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from torch_reference import resnet

PLACEHOLDER = 1e-8


class ChannelAttention(nn.Module):
  def __init__(self, input_channels: int, internal_neurons: int):
    super().__init__()
    self.fc1 = nn.Conv2d(input_channels, internal_neurons, 1, bias=True)
    self.fc2 = nn.Conv2d(internal_neurons, input_channels, 1, bias=True)

  def forward(self, inputs: torch.Tensor) -> torch.Tensor:
    def prior(pooled):
      return torch.sigmoid(self.fc2(F.relu(self.fc1(pooled))))
    return prior(F.adaptive_avg_pool2d(inputs, 1)) + prior(F.adaptive_max_pool2d(inputs, 1))


class CPCA(nn.Module):
  """CPCA(C, C): the single 1×1 ``conv`` P used three times; y = P(P(z) ⊙ u)."""

  def __init__(self, in_channels: int, out_channels: int, channel_attention_reduce: int = 4):
    super().__init__()
    assert in_channels == out_channels
    c = in_channels
    self.ca = ChannelAttention(c, c // channel_attention_reduce)
    self.dconv5_5 = nn.Conv2d(c, c, 5, padding=2, groups=c)
    self.dconv1_7 = nn.Conv2d(c, c, (1, 7), padding=(0, 3), groups=c)
    self.dconv7_1 = nn.Conv2d(c, c, (7, 1), padding=(3, 0), groups=c)
    self.dconv1_11 = nn.Conv2d(c, c, (1, 11), padding=(0, 5), groups=c)
    self.dconv11_1 = nn.Conv2d(c, c, (11, 1), padding=(5, 0), groups=c)
    self.dconv1_21 = nn.Conv2d(c, c, (1, 21), padding=(0, 10), groups=c)
    self.dconv21_1 = nn.Conv2d(c, c, (21, 1), padding=(10, 0), groups=c)
    self.conv = nn.Conv2d(c, c, 1, padding=0)
    self.act = nn.GELU()

  def forward(self, inputs: torch.Tensor) -> torch.Tensor:
    u = self.act(self.conv(inputs))
    u = self.ca(u) * u
    x_init = self.dconv5_5(u)
    x_1 = self.dconv7_1(self.dconv1_7(x_init))
    x_2 = self.dconv11_1(self.dconv1_11(x_init))
    x_3 = self.dconv21_1(self.dconv1_21(x_init))
    x = x_1 + x_2 + x_3 + x_init
    return self.conv(self.conv(x) * u)


class VisualExtractor(nn.Module):
  """ResNet trunk → CPCA → local_embedder; (B, 3, H, W) → (patch_feats (B, h·w, d_e), avg_feats (B, d_e))."""

  def __init__(self, depth: int = 101, widths=(64, 128, 256, 512), embed_size: int = 1024):
    super().__init__()
    net = resnet.ResNet(depth, tuple(widths))
    channels = net.fc.in_features
    self.model = resnet.features(net)
    self.cpca = CPCA(channels, channels)
    self.local_embedder = nn.Conv2d(channels, embed_size, 1, bias=False)

  def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    e = self.local_embedder(self.cpca(self.model(images)))
    avg_feats = e.mean(dim=(2, 3))
    patch_feats = e.reshape(e.shape[0], e.shape[1], -1).permute(0, 2, 1)
    return patch_feats, avg_feats


class SimpleConvNet(nn.Module):
  """Five [conv3×3 no padding (bias) → BN → ReLU], global average pool: (N, 3, S, S) → (N, widths[-1])."""

  def __init__(self, widths=(64, 128, 256, 512, 1024), strides=(1, 2, 2, 2, 2)):
    super().__init__()
    c = 3
    for i, (w, s) in enumerate(zip(widths, strides), start=1):
      setattr(self, f"conv{i}", nn.Conv2d(c, w, 3, stride=s, padding=0))
      setattr(self, f"bn{i}", nn.BatchNorm2d(w))
      c = w
    self.n = len(widths)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    for i in range(1, self.n + 1):
      x = F.relu(getattr(self, f"bn{i}")(getattr(self, f"conv{i}")(x)))
    return F.adaptive_avg_pool2d(x, 1).flatten(1)


class conv_block(nn.Module):  # noqa: N801  (HCF-Net's name)
  def __init__(self, in_features: int, out_features: int, kernel_size: int, padding: int, activation: bool):
    super().__init__()
    self.conv = nn.Conv2d(in_features, out_features, kernel_size, padding=padding, bias=True)
    self.norm = nn.BatchNorm2d(out_features)
    self.act = activation

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = self.norm(self.conv(x))
    return F.relu(x) if self.act else x


class LocalGlobalAttention(nn.Module):
  def __init__(self, output_dim: int, patch_size: int):
    super().__init__()
    self.output_dim = output_dim
    self.patch_size = patch_size
    self.mlp1 = nn.Linear(patch_size * patch_size, output_dim // 2)
    self.norm = nn.LayerNorm(output_dim // 2)
    self.mlp2 = nn.Linear(output_dim // 2, output_dim)
    self.conv = nn.Conv2d(output_dim, output_dim, 1)
    self.prompt = nn.Parameter(torch.randn(output_dim))
    self.top_down_transform = nn.Parameter(torch.eye(output_dim))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = x.permute(0, 2, 3, 1)
    b, h, w, c = x.shape
    p = self.patch_size
    # unfold → (B, H/P, W/P, C, P, P): each tile's values in (channel, row, col) order, reshaped to (P², C).
    tiles = x.unfold(1, p, p).unfold(2, p, p).reshape(b, -1, p * p, c).mean(dim=-1)
    z = self.mlp2(self.norm(self.mlp1(tiles)))
    z = z * F.softmax(z, dim=-1)
    cos = F.normalize(z, dim=-1) @ F.normalize(self.prompt[None, ..., None], dim=1)
    z = (z * cos.clamp(0, 1)) @ self.top_down_transform
    z = z.reshape(b, h // p, w // p, self.output_dim).permute(0, 3, 1, 2)
    z = F.interpolate(z, size=(h, w), mode="bilinear", align_corners=False)
    return self.conv(z)


class ECA(nn.Module):
  def __init__(self, in_channel: int, gamma: int = 2, b: int = 1):
    super().__init__()
    k = int(abs((math.log(in_channel, 2) + b) / gamma))
    k = k if k % 2 else k + 1
    self.pool = nn.AdaptiveAvgPool2d(1)
    self.conv = nn.Sequential(nn.Conv1d(1, 1, k, padding=k // 2, bias=False), nn.Sigmoid())

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    out = self.pool(x).view(x.size(0), 1, x.size(1))
    return self.conv(out).view(x.size(0), x.size(1), 1, 1) * x


class SpatialAttentionModule(nn.Module):
  def __init__(self):
    super().__init__()
    self.conv2d = nn.Conv2d(2, 1, 7, stride=1, padding=3)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    out = torch.cat([x.mean(dim=1, keepdim=True), x.max(dim=1, keepdim=True)[0]], dim=1)
    return torch.sigmoid(self.conv2d(out)) * x


class PPA(nn.Module):
  def __init__(self, in_features: int, filters: int, dropout: float = 0.1):
    super().__init__()
    self.skip = conv_block(in_features, filters, 1, 0, activation=False)
    self.c1 = conv_block(in_features, filters, 3, 1, activation=True)
    self.c2 = conv_block(filters, filters, 3, 1, activation=True)
    self.c3 = conv_block(filters, filters, 3, 1, activation=True)
    self.sa = SpatialAttentionModule()
    self.cn = ECA(filters)
    self.lga2 = LocalGlobalAttention(filters, 2)
    self.lga4 = LocalGlobalAttention(filters, 4)
    self.bn1 = nn.BatchNorm2d(filters)
    self.drop = nn.Dropout2d(dropout)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x_skip = self.skip(x)
    x_lga2 = self.lga2(x_skip)
    x_lga4 = self.lga4(x_skip)
    x1 = self.c1(x)
    x2 = self.c2(x1)
    x3 = self.c3(x2)
    x = x1 + x2 + x3 + x_skip + x_lga2 + x_lga4
    x = self.sa(self.cn(x))
    return F.relu(self.bn1(self.drop(x)))


class MultiTargetExtractor(nn.Module):
  """``simple``, ``visual_extractor``, ``region_visual_extractor`` (PPA(3, 3) or ``nn.Identity`` for
  ``lera="identity"``); forward(images (B, 3, H, W), regions (B, M, 3, S, S)) → (region_feats, avg_feats,
  patch_feats)."""

  def __init__(self, depth: int = 101, resnet_widths=(64, 128, 256, 512), simple_widths=(64, 128, 256, 512, 1024),
               lera: str = "ppa", lera_dropout: float = 0.1):
    super().__init__()
    self.simple = SimpleConvNet(simple_widths)
    self.visual_extractor = VisualExtractor(depth, resnet_widths, simple_widths[-1])
    self.region_visual_extractor = PPA(3, 3, lera_dropout) if lera == "ppa" else nn.Identity()
    self.embed_size = simple_widths[-1]

  def region_features(self, regions: torch.Tensor) -> torch.Tensor:
    """The code's double loop over images (outer) and boxes (inner), one region at a time (placeholder test
    against float32(1e-8) also for a float64 copy of the model)."""
    feats = []
    for i in range(regions.shape[0]):
      row = []
      for j in range(regions.shape[1]):
        region = regions[i, j]
        if torch.all(region == torch.tensor(PLACEHOLDER, dtype=torch.float32).to(region.dtype)):  # float32's 1e-8
          row.append(torch.full((1, self.embed_size), PLACEHOLDER))
        else:
          row.append(self.simple(self.region_visual_extractor(region[None])))
      feats.append(torch.cat(row, 0))
    return torch.stack(feats)

  def forward(self, images: torch.Tensor, regions: torch.Tensor):
    region_feats = self.region_features(regions)
    patch_feats, avg_feats = self.visual_extractor(images)
    return region_feats, avg_feats, patch_feats


@torch.no_grad()
def randomize_(model: nn.Module, generator: torch.Generator, scale: float = 0.2, spatial_gain: float = 5.0) -> None:
  """``resnet.randomize_norms_`` (BN affine + running stats) plus the LayerNorms and PPA's ``top_down_transform``
  (identity at init, which would hide a transposed matrix); PPA's spatial-attention conv weights × ``spatial_gain``.
  At init that gate is nearly constant over the pixels, so the final BatchNorm all but cancels the gradient of
  the spatially constant ``lga*`` branches (f = 3): their leaves would carry ~1e-5 of the gradient norm and
  float32 noise of ~1e-4 relative, torch's own included."""
  resnet.randomize_norms_(model, generator, scale)
  for mod in model.modules():
    if isinstance(mod, nn.LayerNorm):
      mod.weight.mul_(1 + scale * torch.randn(mod.weight.shape, generator=generator))
      mod.bias.add_(scale * torch.randn(mod.bias.shape, generator=generator))
    elif isinstance(mod, LocalGlobalAttention):
      mod.top_down_transform.add_(0.5 * torch.randn(mod.top_down_transform.shape, generator=generator))
    elif isinstance(mod, SpatialAttentionModule):
      mod.conv2d.weight.mul_(spatial_gain)


def _relevance(a: torch.Tensor, lam: float) -> torch.Tensor:
  g = F.leaky_relu(a, 0.1)
  g = g / (g.pow(2).sum(dim=0, keepdim=True).sqrt() + 1e-8)
  return F.softmax(lam * g, dim=1)


def naaf_similarity(x: torch.Tensor, y: torch.Tensor, lam: float = 20.0, thres: float = 0.0,
                    imgnorm: bool = True) -> torch.Tensor:
  """§6.3 literally: x (m, d) unit text rows, y (n, d) visual rows → scalar."""
  if imgnorm:
    y = y / (y.norm(dim=-1, keepdim=True) + 1e-8)
  a = x @ y.T
  d = a - thres
  rho = d.max(dim=1).values
  neg = torch.where(rho < 0, rho, torch.zeros_like(rho))
  q = torch.where(d > 0, torch.exp(lam * d), torch.zeros_like(d))
  p = q / (q.sum(dim=1, keepdim=True) + 1e-8)
  c = p @ y
  posf = (x * c).sum(dim=1) / c.norm(dim=1).clamp(min=1e-8)
  posr = (a * _relevance(a, lam)).sum(dim=1)
  return (neg + posf + posr).mean()


def scan_similarity(x: torch.Tensor, y: torch.Tensor, lam: float = 20.0, imgnorm: bool = True) -> torch.Tensor:
  """§6.3 variant ``scan``: mean_w cos(x_w, Σ_n r_wn y_n) (SCAN's cosine: ⟨x, c⟩ / max(‖x‖‖c‖, 1e-8))."""
  if imgnorm:
    y = y / (y.norm(dim=-1, keepdim=True) + 1e-8)
  c = _relevance(x @ y.T, lam) @ y
  return ((x * c).sum(dim=1) / (x.norm(dim=1) * c.norm(dim=1)).clamp(min=1e-8)).mean()


# --- the whole model: text branches, [RECON] GAB / LAB, the R2Gen encoder-decoder ------------------------------

class TextExtractor(nn.Module):
  """§5: HF ``BertModel`` (``bert``) → ``fc`` (hidden → d_e) → F.normalize; (ids, mask) (N, T) → (N, T, d_e)."""

  def __init__(self, bert_config, embed_size: int):
    super().__init__()
    import transformers  # pylint: disable=g-import-not-at-top

    self.bert = transformers.BertModel(bert_config)
    self.fc = nn.Linear(bert_config.hidden_size, embed_size)

  def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    h = self.bert(input_ids=ids, attention_mask=mask).last_hidden_state
    return F.normalize(self.fc(h), dim=-1)


def ranking_loss(sim: torch.Tensor, margin: float) -> torch.Tensor:
  """§6.6 hardest-negative hinge, sum reduction, written with loops (sim: images × texts)."""
  b = sim.shape[0]
  total = sim.new_zeros(())
  for i in range(b):
    total = total + torch.stack([F.relu(margin + sim[i, j] - sim[i, i]) for j in range(b) if j != i]).max()
  for j in range(b):
    total = total + torch.stack([F.relu(margin + sim[i, j] - sim[j, j]) for i in range(b) if i != j]).max()
  return total


class Align(nn.Module):
  """The official ``align`` attribute tree (§6.1): ``visual_extractor``, ``text_extractor``, ``textlist_extractor``."""

  def __init__(self, cfg, bert_config):
    super().__init__()
    self.visual_extractor = MultiTargetExtractor(cfg.depth, cfg.resnet_widths, cfg.simple_widths, cfg.lera, 0.0)
    self.text_extractor = TextExtractor(bert_config, cfg.simple_widths[-1])
    self.textlist_extractor = TextExtractor(bert_config, cfg.simple_widths[-1])


class Align2Gen(nn.Module):
  """``align`` + the R2Gen ``encoder_decoder`` (``encoder_decoder``, d_vf = d_e). The [RECON] fusion
  ``att_feats = cat(patch_feats, region_feats)`` WITHOUT a source mask (``mask_empty_regions: false``), GAB over
  (report tokens, patches), LAB over (sentence vectors, valid regions) of the images with both."""

  def __init__(self, cfg, bert_config, encoder_decoder: nn.Module, margin: float = 0.2, lam: float = 20.0):
    super().__init__()
    self.align = Align(cfg, bert_config)
    self.encoder_decoder = encoder_decoder
    self.margin, self.lam = margin, lam

  def forward(self, images, targets, regions, text_ids, text_mask, sentence_ids, sentence_mask):
    """images (B, 3, H, W), regions (B, M, 3, R, R), targets (B, T); text (B, Tw); sentences (B, S, Ts) →
    (log-probs (B, T−1, V), gab, lab)."""
    region_feats, _, patch_feats = self.align.visual_extractor(images, regions)
    memory = self.encoder_decoder.encode(torch.cat([patch_feats, region_feats], 1))
    seq = targets[:, :-1]
    keys = seq > 0
    keys[:, 0] = True
    mask = keys[:, None, :] & torch.tril(torch.ones(1, seq.shape[1], seq.shape[1], dtype=torch.bool))
    logprobs, _ = self.encoder_decoder.logprobs(memory, seq, mask)
    b = images.shape[0]
    tokens = self.align.text_extractor(text_ids, text_mask)
    lengths = text_mask.sum(1)
    sim_g = torch.stack([torch.stack([naaf_similarity(tokens[j, :lengths[j]], patch_feats[i], self.lam)
                                      for j in range(b)]) for i in range(b)])
    gab = ranking_loss(sim_g, self.margin)
    units, valid_regions = [], []
    for i in range(b):  # TextListExtractor: each image's sentences as one BERT batch
      rows = sentence_mask[i].sum(1) > 0
      s_tok = self.align.textlist_extractor(sentence_ids[i][rows], sentence_mask[i][rows])
      w = sentence_mask[i][rows].to(s_tok.dtype)[..., None]
      mean = (s_tok * w).sum(1) / w.sum(1)
      units.append(mean / (mean.norm(dim=-1, keepdim=True) + 1e-8))
      keep = torch.tensor([not torch.all(regions[i, j] == torch.tensor(PLACEHOLDER, dtype=torch.float32))
                           for j in range(regions.shape[1])])
      valid_regions.append(region_feats[i][keep])
    kept = [i for i in range(b) if len(units[i]) and len(valid_regions[i])]
    lab = images.new_zeros(())
    if len(kept) >= 2:
      sim_l = torch.stack([torch.stack([naaf_similarity(units[j], valid_regions[i], self.lam) for j in kept])
                           for i in kept])
      lab = ranking_loss(sim_l, self.margin)
    return logprobs, gab, lab
