"""A compact PyTorch CAMANet written from the reference spec (not from the official repository).

State-dict keys and shapes are exactly those of the official model (spec §11): DenseNet ``.features`` with the
torchvision module names, the FBL ``norm``/``fore_norm`` alias, the R2Gen encoder-decoder with its PE buffer.
Images are ``(B, V, 3, H, W)`` (V = 1 for MIMIC as well); ``targets``/``masks`` are ``(B, T)`` with T the batch's
own padded length, as in the official collate function.
"""

from __future__ import annotations

import collections
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


# --- DenseNet (torchvision `densenet121().features` layout) ---------------------------------------------------

class DenseLayer(nn.Module):
  """BN → ReLU → conv1×1 (c → bn_size·growth) → BN → ReLU → conv3×3 (→ growth)."""

  def __init__(self, c: int, growth: int, bn_size: int):
    super().__init__()
    self.norm1 = nn.BatchNorm2d(c)
    self.relu1 = nn.ReLU()
    self.conv1 = nn.Conv2d(c, bn_size * growth, 1, bias=False)
    self.norm2 = nn.BatchNorm2d(bn_size * growth)
    self.relu2 = nn.ReLU()
    self.conv2 = nn.Conv2d(bn_size * growth, growth, 3, padding=1, bias=False)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.conv2(self.relu2(self.norm2(self.conv1(self.relu1(self.norm1(x))))))


class DenseBlock(nn.ModuleDict):
  """Layer i sees the channel concatenation [block input, out_1, ..., out_{i-1}]."""

  def __init__(self, num_layers: int, c: int, growth: int, bn_size: int):
    super().__init__({f"denselayer{i + 1}": DenseLayer(c + i * growth, growth, bn_size)
                      for i in range(num_layers)})

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    feats = [x]
    for layer in self.values():
      feats.append(layer(torch.cat(feats, 1)))
    return torch.cat(feats, 1)


def densenet_features(growth_rate: int = 32, block_config=(6, 12, 24, 16), num_init_features: int = 64,
                      bn_size: int = 4) -> tuple[nn.Sequential, int]:
  """torchvision DenseNet ``.features`` (no final ReLU); returns (module, output channels)."""
  layers: list[tuple[str, nn.Module]] = [
      ("conv0", nn.Conv2d(3, num_init_features, 7, stride=2, padding=3, bias=False)),
      ("norm0", nn.BatchNorm2d(num_init_features)), ("relu0", nn.ReLU()),
      ("pool0", nn.MaxPool2d(3, stride=2, padding=1))]
  c = num_init_features
  for b, n in enumerate(block_config, start=1):
    layers.append((f"denseblock{b}", DenseBlock(n, c, growth_rate, bn_size)))
    c += n * growth_rate
    if b != len(block_config):
      layers.append((f"transition{b}", nn.Sequential(collections.OrderedDict([
          ("norm", nn.BatchNorm2d(c)), ("relu", nn.ReLU()), ("conv", nn.Conv2d(c, c // 2, 1, bias=False)),
          ("pool", nn.AvgPool2d(2, stride=2))]))))
      c //= 2
  layers.append(("norm5", nn.BatchNorm2d(c)))
  return nn.Sequential(collections.OrderedDict(layers)), c


class VisualExtractor(nn.Module):
  """Per-view DenseNet calls, token concat, global mean, 14-way head and no-grad CAMs (spec §3)."""

  def __init__(self, cfg):
    super().__init__()
    self.model, self.channels = densenet_features(cfg.growth_rate, tuple(cfg.block_config),
                                                  cfg.num_init_features, cfg.bn_size)
    self.head = nn.Linear(self.channels, cfg.num_classes)

  def forward(self, images: torch.Tensor):
    """images (B, V, 3, H, W) → patch_feats (B, V·h·w, C), gbl (B, C), logits (B, classes), cams (B, classes, N)."""
    tokens, gaps = [], []
    for v in range(images.shape[1]):  # separate calls: per-view BN statistics / running-stat updates
      f = F.relu(self.model(images[:, v]))
      tokens.append(f.flatten(2).transpose(1, 2))
      gaps.append(f.mean((2, 3)))
    patch_feats = torch.cat(tokens, 1)
    gbl = sum(gaps) / len(gaps)
    logits = self.head(gbl)
    with torch.no_grad():
      cams = F.relu(torch.einsum("bnk,ck->bcn", patch_feats, self.head.weight))
    return patch_feats, gbl, logits, cams


# --- R2Gen building blocks ------------------------------------------------------------------------------------

class LayerNorm(nn.Module):
  """R2Gen LayerNorm: gamma·(x − mean)/(unbiased std + eps) + beta."""

  def __init__(self, d: int, eps: float = 1e-6):
    super().__init__()
    self.gamma = nn.Parameter(torch.ones(d))
    self.beta = nn.Parameter(torch.zeros(d))
    self.eps = eps

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.gamma * (x - x.mean(-1, keepdim=True)) / (x.std(-1, keepdim=True) + self.eps) + self.beta


class ConditionalLayerNorm(nn.Module):
  """MCLN: gamma/beta shifted by MLPs of the relational-memory output R (B, L, slots·d_rm)."""

  def __init__(self, d: int, rm_num_slots: int, rm_d_model: int, eps: float = 1e-6):
    super().__init__()
    self.gamma = nn.Parameter(torch.ones(d))
    self.beta = nn.Parameter(torch.zeros(d))
    mlp = lambda: nn.Sequential(nn.Linear(rm_num_slots * rm_d_model, d), nn.ReLU(), nn.Linear(d, d))  # noqa: E731
    self.mlp_gamma, self.mlp_beta = mlp(), mlp()
    self.eps = eps

  def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
    gamma = self.gamma + self.mlp_gamma(memory)
    beta = self.beta + self.mlp_beta(memory)
    return gamma * (x - x.mean(-1, keepdim=True)) / (x.std(-1, keepdim=True) + self.eps) + beta


class MultiHeadedAttention(nn.Module):
  """Q/K/V/out Linears; −1e9 mask fill; stores the post-dropout probabilities in ``self.attn``."""

  def __init__(self, h: int, d_model: int, dropout: float = 0.1):
    super().__init__()
    self.h, self.d_k = h, d_model // h
    self.linears = nn.ModuleList([nn.Linear(d_model, d_model) for _ in range(4)])
    self.dropout = nn.Dropout(dropout)
    self.attn: torch.Tensor | None = None

  def forward(self, q, k, v, mask: torch.Tensor | None = None) -> torch.Tensor:
    b = q.shape[0]
    q, k, v = [lin(x).view(b, -1, self.h, self.d_k).transpose(1, 2) for lin, x in zip(self.linears, (q, k, v))]
    scores = q @ k.transpose(-2, -1) / math.sqrt(self.d_k)
    if mask is not None:
      scores = scores.masked_fill(mask.unsqueeze(1) == 0, -1e9)
    self.attn = self.dropout(F.softmax(scores, dim=-1))
    x = (self.attn @ v).transpose(1, 2).contiguous().view(b, -1, self.h * self.d_k)
    return self.linears[3](x)


class PositionwiseFeedForward(nn.Module):

  def __init__(self, d_model: int, d_ff: int, dropout: float):
    super().__init__()
    self.w_1, self.w_2, self.dropout = nn.Linear(d_model, d_ff), nn.Linear(d_ff, d_model), nn.Dropout(dropout)

  def forward(self, x):
    return self.w_2(self.dropout(F.relu(self.w_1(x))))


class SublayerConnection(nn.Module):
  """Pre-norm residual: x + dropout(f(norm(x[, memory])))."""

  def __init__(self, norm: nn.Module, dropout: float):
    super().__init__()
    self.norm, self.dropout = norm, nn.Dropout(dropout)

  def forward(self, x, f, *memory):
    return x + self.dropout(f(self.norm(x, *memory)))


class EncoderLayer(nn.Module):

  def __init__(self, d, h, d_ff, dropout):
    super().__init__()
    self.self_attn = MultiHeadedAttention(h, d, dropout)
    self.feed_forward = PositionwiseFeedForward(d, d_ff, dropout)
    self.sublayer = nn.ModuleList([SublayerConnection(LayerNorm(d), dropout) for _ in range(2)])

  def forward(self, x):
    x = self.sublayer[0](x, lambda y: self.self_attn(y, y, y))
    return self.sublayer[1](x, self.feed_forward)


class DecoderLayer(nn.Module):

  def __init__(self, d, h, d_ff, dropout, rm_num_slots, rm_d_model):
    super().__init__()
    self.self_attn = MultiHeadedAttention(h, d, dropout)
    self.src_attn = MultiHeadedAttention(h, d, dropout)
    self.feed_forward = PositionwiseFeedForward(d, d_ff, dropout)
    self.sublayer = nn.ModuleList([
        SublayerConnection(ConditionalLayerNorm(d, rm_num_slots, rm_d_model), dropout) for _ in range(3)])

  def forward(self, x, hmem, tgt_mask, rm_out):
    x = self.sublayer[0](x, lambda y: self.self_attn(y, y, y, tgt_mask), rm_out)
    x = self.sublayer[1](x, lambda y: self.src_attn(y, hmem, hmem), rm_out)
    return self.sublayer[2](x, self.feed_forward, rm_out)


class Stack(nn.Module):
  """``layers`` then a final plain LayerNorm (encoder and decoder)."""

  def __init__(self, layers: list[nn.Module], d: int):
    super().__init__()
    self.layers, self.norm = nn.ModuleList(layers), LayerNorm(d)

  def forward(self, x, *args):
    for layer in self.layers:
      x = layer(x, *args)
    return self.norm(x)


class Embeddings(nn.Module):

  def __init__(self, d_model: int, vocab: int):
    super().__init__()
    self.lut, self.d_model = nn.Embedding(vocab, d_model), d_model

  def forward(self, x):
    return self.lut(x) * math.sqrt(self.d_model)


class PositionalEncoding(nn.Module):
  """Interleaved sin/cos (1, 5000, D) buffer ``pe``, then dropout."""

  def __init__(self, d_model: int, dropout: float, max_len: int = 5000):
    super().__init__()
    self.dropout = nn.Dropout(dropout)
    pos = torch.arange(0, max_len).unsqueeze(1).float()
    div = torch.exp(torch.arange(0, d_model, 2).float() * -(math.log(10000.0) / d_model))
    pe = torch.zeros(max_len, d_model)
    pe[:, 0::2], pe[:, 1::2] = torch.sin(pos * div), torch.cos(pos * div)
    self.register_buffer("pe", pe.unsqueeze(0))

  def forward(self, x):
    return self.dropout(x + self.pe[:, :x.shape[1]])


class RelationalMemory(nn.Module):
  """R2Gen relational memory; returns the memory after reading each token, (B, L, slots·d)."""

  def __init__(self, num_slots: int, d_model: int, num_heads: int):
    super().__init__()
    self.num_slots, self.d_model = num_slots, d_model
    self.attn = MultiHeadedAttention(num_heads, d_model)
    self.mlp = nn.Sequential(nn.Linear(d_model, d_model), nn.ReLU(), nn.Linear(d_model, d_model), nn.ReLU())
    self.W, self.U = nn.Linear(d_model, 2 * d_model), nn.Linear(d_model, 2 * d_model)

  def init_memory(self, b: int) -> torch.Tensor:
    m = torch.zeros(b, self.num_slots, self.d_model)
    m[:, :, :self.num_slots] = torch.eye(self.num_slots)
    return m

  def step(self, e: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    kv = torch.cat([m, e[:, None]], 1)
    z = m + self.attn(m, kv, kv)
    z = z + self.mlp(z)
    i, f = torch.split(self.W(e[:, None]) + self.U(torch.tanh(m)), self.d_model, dim=2)
    return torch.sigmoid(i) * torch.tanh(z) + torch.sigmoid(f) * m

  def forward(self, emb: torch.Tensor) -> torch.Tensor:
    m, outs = self.init_memory(emb.shape[0]).to(emb), []
    for t in range(emb.shape[1]):
      m = self.step(emb[:, t], m)
      outs.append(m.reshape(m.shape[0], -1))
    return torch.stack(outs, 1)


class Transformer(nn.Module):
  """``encoder_decoder.model``: encoder, decoder, tgt_embed (lut + PE), rm."""

  def __init__(self, cfg):
    super().__init__()
    d, h, ff, p = cfg.d_model, cfg.num_heads, cfg.d_ff, cfg.dropout
    self.encoder = Stack([EncoderLayer(d, h, ff, p) for _ in range(cfg.num_layers)], d)
    self.decoder = Stack([DecoderLayer(d, h, ff, p, cfg.rm_num_slots, cfg.rm_d_model)
                          for _ in range(cfg.num_layers)], d)
    self.tgt_embed = nn.Sequential(Embeddings(d, cfg.vocab_size), PositionalEncoding(d, p))
    self.rm = RelationalMemory(cfg.rm_num_slots, cfg.rm_d_model, cfg.rm_num_heads)

  def decode(self, hmem: torch.Tensor, seq: torch.Tensor, tgt_mask: torch.Tensor):
    """Returns (decoder output (B, L, D), target embedding E (B, L, D)); one dropout draw feeds RM and decoder."""
    emb = self.tgt_embed(seq)
    return self.decoder(emb, hmem, tgt_mask, self.rm(emb)), emb


def subsequent_mask(n: int) -> torch.Tensor:
  return torch.tril(torch.ones(1, n, n, dtype=torch.bool))


class EncoderDecoder(nn.Module):
  """``encoder_decoder``: att_embed (Linear → ReLU → Dropout 0.5), the Transformer, ``logit``."""

  def __init__(self, cfg, d_vf: int):
    super().__init__()
    self.att_embed = nn.Sequential(nn.Linear(d_vf, cfg.d_model), nn.ReLU(), nn.Dropout(cfg.drop_prob_lm))
    self.model = Transformer(cfg)
    self.logit = nn.Linear(cfg.d_model, cfg.vocab_size)

  def encode(self, att_feats: torch.Tensor) -> torch.Tensor:
    """(B, 1+N, C) → Henc (B, 1+N, D)."""
    return self.model.encoder(self.att_embed(att_feats))

  def logprobs(self, hmem: torch.Tensor, seq: torch.Tensor, tgt_mask: torch.Tensor):
    out, emb = self.model.decode(hmem, seq, tgt_mask)
    return F.log_softmax(self.logit(out), dim=-1), emb


class ForeBackLearning(nn.Module):
  """old_forebacklearning: VDM from predicted-label CAMs, fore_rep = LN(Σ_n d_v·patch) (spec §4)."""

  def __init__(self, c: int):
    super().__init__()
    self.norm = LayerNorm(c)
    self.fore_norm = self.norm  # the same module object: appears twice in the state_dict
    self.back_norm = LayerNorm(c)

  def forward(self, patch_feats, cams, logits):
    with torch.no_grad():
      pred = (torch.sigmoid(logits) >= 0.5).float()
      fore_map = minmax_normalize((pred[:, :, None] * cams).max(1)[0])
    fore_rep = self.fore_norm(fore_map[:, None, :] @ patch_feats)
    return fore_rep, fore_map


def minmax_normalize(x: torch.Tensor) -> torch.Tensor:
  """(B, N): (x − min)/max(x − min) with the denominator clamped to 1e-12 (zero gradient where clamped)."""
  x = x - x.min(-1, keepdim=True)[0]
  den = x.max(-1, keepdim=True)[0]
  return x / torch.where(den < 1e-12, torch.full_like(den, 1e-12), den)


# --- VTAC -----------------------------------------------------------------------------------------------------

def vtac_counts(targets: torch.Tensor, topk: float) -> tuple[int, torch.Tensor, torch.Tensor]:
  """(k_batch from the batch pad length, per-sample m_b = ceil(float32 len·topk), valid (B, L))."""
  seq = targets[:, :-1]
  valid = seq > 0
  valid[:, 0] = True
  lens = valid.sum(-1)
  return int(topk * seq.shape[1]), torch.ceil(lens * topk).long(), valid


def cam_attn_con(r: torch.Tensor, emb: torch.Tensor, attn: torch.Tensor, targets: torch.Tensor,
                 topk: float) -> torch.Tensor:
  """CamAttnCon, method 'max' (spec §6): r (B, D), emb (B, L, D), attn (B, H, L, N) → total_attn (B, N)."""
  k_batch, m, valid = vtac_counts(targets, topk)
  a = attn.mean(1)
  s = F.cosine_similarity(emb, r[:, None, :].expand_as(emb), dim=-1, eps=1e-8).masked_fill(~valid, -1.0)
  idx = s.topk(k_batch, dim=-1, largest=True, sorted=True)[1]
  w = F.relu(s[:, :, None] * a)
  rows = [w[b, idx[b, :min(int(m[b]), k_batch)]].max(0)[0] for b in range(w.shape[0])]
  return minmax_normalize(torch.stack(rows))


# --- the model ------------------------------------------------------------------------------------------------

class CAMANet(nn.Module):
  """Full CAMANet (fbl + attn_cam, attn_method max). ``cfg`` is ``config.model`` (ml_collections or namespace)."""

  def __init__(self, cfg):
    super().__init__()
    self.cfg = cfg
    self.visual_extractor = VisualExtractor(cfg)
    self.fore_back_learn = ForeBackLearning(self.visual_extractor.channels)
    self.encoder_decoder = EncoderDecoder(cfg, self.visual_extractor.channels)

  def encode(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Visual path + FBL + encoder. ``henc`` (B, 1+N, D); the decoder memory is ``henc[:, 1:]``."""
    patch_feats, gbl, logits, cams = self.visual_extractor(images)
    fore_rep, fore_map = self.fore_back_learn(patch_feats, cams, logits)
    henc = self.encoder_decoder.encode(torch.cat([fore_rep, patch_feats], 1))
    return dict(patch_feats=patch_feats, gbl=gbl, logits=logits, cams=cams, vdm=fore_map, henc=henc)

  def forward(self, images: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """Teacher-forced forward: adds ``logprobs`` (B, T−1, K), ``tdm`` (B, N), ``attn`` (B, H, T−1, N)."""
    out = self.encode(images)
    seq = targets[:, :-1]
    pad = seq > 0
    pad[:, 0] = True
    tgt_mask = pad[:, None, :] & subsequent_mask(seq.shape[1])
    hmem = out["henc"][:, 1:]
    out["logprobs"], emb = self.encoder_decoder.logprobs(hmem, seq, tgt_mask)
    attn = self.encoder_decoder.model.decoder.layers[self.cfg.layer_id].src_attn.attn
    out["attn"] = attn
    out["tdm"] = cam_attn_con(hmem[:, 0], emb, attn, targets, self.cfg.topk)  # first patch token (spec 5.6 bug)
    return out

  def decoder_memory(self, images: torch.Tensor) -> torch.Tensor:
    """Eval-mode decoder memory ``henc[:, 1:]`` (the discriminative token is not attended)."""
    return self.encode(images)["henc"][:, 1:]

  def step_logprobs(self, hmem: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
    """Full-prefix recompute (causal mask only): log-probs of the next token, (B, K)."""
    logprobs, _ = self.encoder_decoder.logprobs(hmem, ys, subsequent_mask(ys.shape[1]))
    return F.log_softmax(logprobs[:, -1], dim=-1)


# --- losses ---------------------------------------------------------------------------------------------------

def losses(out: dict[str, torch.Tensor], targets, masks, labels, cls_w: float, mse_w: float) -> dict[str, Any]:
  """CE (token mean over the batch), BCEWithLogits, MSE on samples with ≥1 positive label, weighted total."""
  tgt, m = targets[:, 1:], masks[:, 1:]
  nll = -out["logprobs"].gather(2, tgt[:, :, None])[:, :, 0]
  ce = (nll * m).sum() / m.sum()
  bce = F.binary_cross_entropy_with_logits(out["logits"], labels)
  keep = labels.sum(-1) != 0
  mse = F.mse_loss(out["tdm"][keep], out["vdm"][keep])
  return dict(ce=ce, bce=bce, mse=mse, loss=ce + cls_w * bce + mse_w * mse)


# --- beam search (spec §9) ------------------------------------------------------------------------------------

@torch.no_grad()
def beam_search(model: nn.Module, images: torch.Tensor, max_len: int, beam_size: int = 3) -> list[list[int]]:
  """Official beam search of the R2Gen code base (eval mode; CAMANet, R2Gen: any ``model`` with
  ``decoder_memory`` and ``step_logprobs``): full-prefix recompute, −1000 on finished beams, forced termination
  at ``max_len``, best by raw summed log-prob. Returns the token ids per image (without BOS, cut before padding)."""
  hmem = model.decoder_memory(images)
  b = hmem.shape[0]
  logp = model.step_logprobs(hmem, torch.zeros(b, 1, dtype=torch.long))[:, None]  # (B, 1, K)
  hmem = hmem.repeat_interleave(beam_size, 0)
  seqs = torch.zeros(b, 1, 0, dtype=torch.long)
  beam_sum = torch.zeros(b, 1)
  done: list[list[tuple[float, list[int]]]] = [[] for _ in range(b)]
  for t in range(max_len):
    k = logp.shape[-1]
    vals, ix = (beam_sum[:, :, None] + logp).reshape(b, -1).topk(beam_size, -1, largest=True, sorted=True)
    beam_ix, tok = ix // k, ix % k
    seqs = torch.cat([torch.gather(seqs, 1, beam_ix[:, :, None].expand(-1, -1, seqs.shape[2])), tok[:, :, None]], 2)
    beam_sum = vals.clone()
    ended = (tok == 0) | (t == max_len - 1)
    for i in range(b):
      for j in range(beam_size):
        if ended[i, j]:
          done[i].append((float(beam_sum[i, j]), seqs[i, j].tolist()))
    beam_sum[ended] -= 1000
    if t < max_len - 1:
      ys = torch.cat([torch.zeros(b * beam_size, 1, dtype=torch.long), seqs.reshape(b * beam_size, -1)], 1)
      logp = model.step_logprobs(hmem, ys).reshape(b, beam_size, -1)
  best = [max(d, key=lambda x: x[0])[1] for d in done]  # first of equal scores, like a stable sort
  return [s[:s.index(0)] if 0 in s else s for s in best]


# --- initialisation and test helpers --------------------------------------------------------------------------

def init_weights_(model: CAMANet) -> None:
  """Spec §11.4: Xavier-uniform for every ≥2-D tensor inside ``encoder_decoder.model``, MCLN MLP biases 0.1;
  Linear defaults elsewhere (already set by construction); DenseNet convs Kaiming-normal, BN 1/0."""
  for mod in model.visual_extractor.model.modules():
    if isinstance(mod, nn.Conv2d):
      nn.init.kaiming_normal_(mod.weight)
  for p in model.encoder_decoder.model.parameters():
    if p.dim() > 1:
      nn.init.xavier_uniform_(p)
  for mod in model.encoder_decoder.model.modules():
    if isinstance(mod, ConditionalLayerNorm):
      for lin in (*mod.mlp_gamma, *mod.mlp_beta):
        if isinstance(lin, nn.Linear):
          nn.init.constant_(lin.bias, 0.1)


@torch.no_grad()
def randomize_norms_(model: nn.Module, generator: torch.Generator, scale: float = 0.2) -> None:
  """Moves every BN/LayerNorm affine parameter and BN running stat away from its init (1/0), so that a
  converter that swaps or drops them is caught."""
  for mod in model.modules():
    if isinstance(mod, nn.BatchNorm2d):
      mod.weight.mul_(1 + scale * torch.randn(mod.weight.shape, generator=generator))
      mod.bias.add_(scale * torch.randn(mod.bias.shape, generator=generator))
      mod.running_mean.add_(scale * torch.randn(mod.running_mean.shape, generator=generator))
      mod.running_var.mul_(1 + scale * torch.rand(mod.running_var.shape, generator=generator))
    elif isinstance(mod, (LayerNorm, ConditionalLayerNorm)):
      mod.gamma.mul_(1 + scale * torch.randn(mod.gamma.shape, generator=generator))
      mod.beta.add_(scale * torch.randn(mod.beta.shape, generator=generator))


@torch.no_grad()
def calibrate_bn_(model: CAMANet, images: torch.Tensor) -> None:
  """Sets BN running stats to the (cumulative, unbiased) batch statistics of ``images`` so that eval-mode
  activations stay O(1) with random weights."""
  bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
  was_training = model.training
  for bn in bns:
    bn.reset_running_stats()
    bn.momentum = None
  model.train()
  model.visual_extractor(images)
  for bn in bns:
    bn.momentum = 0.1
  model.train(was_training)


def set_dropout_(model: nn.Module, p: float) -> None:
  for mod in model.modules():
    if isinstance(mod, nn.Dropout):
      mod.p = p
