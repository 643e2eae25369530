"""An independent PyTorch reference of CT-AGRG's encoder, stage-1 heads, conditioning MLP and stage-2 model, written
from ct_agrg_spec §3, §5, §6, §7.1 and §10 (the original code is not public any more).

Same module names, Sequential indices and therefore ``state_dict`` keys as the original: ``CTNet`` (§10.2, 134
entries at full size), ``CTNetStep`` (§10.3, 202 entries), ``feature_space_transformation_nn`` ({0, 2, 4}, §10.4),
``ReportGenerationModel`` (§10.4, 1518 entries: RGRG's ``LanguageModel`` over an HF ``GPT2LMHeadModel`` whose
attention layers are replaced by pseudo self-attention, with its aliases). ``rgrg_beam_search``: §7.1's decoding
(transformers 4.53's ``BeamSearchScorer`` as RGRG drives it), which transformers 5.x no longer ships.
The original hard-codes (240, 480, 480) volumes (80 triplets, 7200 flat features); here the triplet count and the
flat size are constructor arguments, as are the MLP widths and the dropout rate, so tiny volumes and dropout-free
train-mode parity run. The trunk is ``torch_reference.resnet``'s ResNet-18 (torchvision's keys and
``children()``), cut as torchvision's ``resnet18`` would be: ``children()[:-2]``.
"""

from __future__ import annotations

import torch
import transformers
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithCrossAttentions

from torch_reference import resnet


class CTNet(nn.Module):
  """(B, 1, D, H, W) → logits (B, num_classes); after ``adjust()`` → e (B, hidden[0]) (§3)."""

  def __init__(self, triplets: int = 80, flat_size: int = 7200, num_classes: int = 18,
               resnet_widths=(64, 128, 256, 512), hidden=(2048, 512, 128), dropout: float = 0.5):
    super().__init__()
    self.triplets = triplets
    self.features = nn.Sequential(*list(resnet.ResNet(18, resnet_widths).children())[:-2])
    self.reducingconvs = nn.Sequential(
        nn.Conv3d(triplets, 64, kernel_size=(3, 3, 3), stride=(3, 1, 1), padding=0), nn.ReLU(inplace=True),
        nn.Conv3d(64, 32, kernel_size=(3, 3, 3), stride=(3, 1, 1), padding=0), nn.ReLU(inplace=True),
        nn.Conv3d(32, 16, kernel_size=(3, 2, 2), stride=(3, 2, 2), padding=0), nn.ReLU(inplace=True))
    widths = (flat_size,) + tuple(hidden)
    layers: list[nn.Module] = []
    for n_in, n_out in zip(widths[:-1], widths[1:]):
      layers += [nn.Linear(n_in, n_out), nn.ReLU(inplace=True), nn.Dropout(dropout)]
    self.classifier = nn.Sequential(*layers, nn.Linear(widths[-1], num_classes))

  def adjust(self) -> None:
    """Stages 1 and 2: keep classifier indices 0..2; ``classifier_`` is built from the already truncated
    classifier, so it is empty (the pre-trained layers 3..9 are discarded)."""
    self.classifier = nn.Sequential(*list(self.classifier.children())[:3])
    self.classifier_ = nn.Sequential(*list(self.classifier.children())[3:])

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    b, _, _, height, width = x.shape
    x = x.view(b * self.triplets, 3, height, width)  # image b·T + j = slices 3j..3j+2
    x = self.features(x)
    x = x.view(b, self.triplets, *x.shape[1:])  # (B, T = Conv3d channels, C = depth, h, w)
    x = self.reducingconvs(x)
    x = x.view(b, -1)  # (C, D, H, W) order
    return self.classifier(x)


class CTNetStep(nn.Module):
  """(B, 1, D, H, W) → (H (B, K, d), logits (B, K)) (§5): ``encoder`` (adjusted CTNet) → ``heads_in`` →
  per-abnormality ``heads_out``."""

  def __init__(self, triplets: int = 80, flat_size: int = 7200, num_abnormalities: int = 18,
               head_dim: int = 1024, head_hidden: int = 128, resnet_widths=(64, 128, 256, 512),
               hidden=(2048, 512, 128), dropout: float = 0.5):
    super().__init__()
    self.num_abnormalities, self.head_dim = num_abnormalities, head_dim
    self.encoder = CTNet(triplets, flat_size, num_abnormalities, resnet_widths, hidden, dropout)
    self.encoder.adjust()
    self.heads_in = nn.Sequential(nn.Linear(hidden[0], num_abnormalities * head_dim), nn.ReLU(inplace=True),
                                  nn.Dropout(dropout))
    self.heads_out = nn.ModuleList([
        nn.Sequential(nn.Linear(head_dim, head_hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
                      nn.Linear(head_hidden, 1)) for _ in range(num_abnormalities)])

  def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    e = self.encoder(x)
    h = self.heads_in(e).view(x.shape[0], self.num_abnormalities, self.head_dim)
    logits = torch.cat([head(h[:, k]) for k, head in enumerate(self.heads_out)], dim=1)
    return h, logits


def abnormality_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
  """L_k = mean_b BCEWithLogits(s_bk, y_bk): (B, K) → (K,) (§5)."""
  return nn.functional.binary_cross_entropy_with_logits(logits, labels, reduction="none").mean(dim=0)


def stage1_backward(model: CTNetStep, volumes: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
  """Stage 1's backward as coded (§5): forward; encoder frozen, each L_k back-propagated (graph retained);
  encoder re-enabled, Σ_k L_k back-propagated. Leaves the gradients in ``.grad`` (heads: 2·∇Σ L_k, encoder:
  ∇Σ L_k, since torch skips accumulation into leaves that no longer require grad); returns (L_k) (K,)."""
  _, logits = model(volumes)
  losses = abnormality_losses(logits, labels)
  for p in model.encoder.parameters():
    p.requires_grad_(False)
  for k in range(losses.shape[0]):
    losses[k].backward(retain_graph=True)
  for p in model.encoder.parameters():
    p.requires_grad_(True)
  losses.sum().backward()
  return losses.detach()


def feature_space_transformation_nn(in_features: int = 18 * 1024, hidden=(4096, 1024), features: int = 1024
                                    ) -> nn.Sequential:
  """Stage 2's conditioning MLP (§6.2 step 5): Linear → ReLU → Linear → ReLU → Linear (indices 0, 2, 4)."""
  return nn.Sequential(nn.Linear(in_features, hidden[0]), nn.ReLU(), nn.Linear(hidden[0], hidden[1]), nn.ReLU(),
                       nn.Linear(hidden[1], features))


def block_vector(h: torch.Tensor, block: torch.Tensor, num_blocks: int) -> torch.Tensor:
  """(N, d), (N,) → (N, K·d): zeros except h[n] at ``d·block[n] : d·(block[n] + 1)`` (§6.2 step 4)."""
  d = h.shape[1]
  c = h.new_zeros(h.shape[0], num_blocks * d)
  for n, k in enumerate(block.tolist()):
    c[n, d * k:d * (k + 1)] = h[n]
  return c


# --- stage 2: ReportGenerationModel (§6, §7, §10.4) -----------------------------------------------------------

MASK_OUT_VALUE = -1e4  # RGRG's `mask_out_value` buffer


class GPT2PseudoAttention(nn.Module):
  """RGRG's pseudo self-attention layer (§6.3): the HF block's ``c_attn`` / ``c_proj`` plus ``uk`` / ``uv``
  (Linear E → E) and the buffers ``causal_mask`` (1, 1, P, P) uint8 lower-triangular and ``mask_out_value``."""

  def __init__(self, attn: nn.Module, config: transformers.GPT2Config):
    super().__init__()
    d, n = config.n_embd, config.n_positions
    self.n_head = config.n_head
    self.c_attn, self.c_proj = attn.c_attn, attn.c_proj
    self.uk, self.uv = nn.Linear(d, d), nn.Linear(d, d)
    self.register_buffer("causal_mask", torch.tril(torch.ones(n, n, dtype=torch.uint8)).view(1, 1, n, n))
    self.register_buffer("mask_out_value", torch.tensor(MASK_OUT_VALUE))
    self.attn_dropout, self.resid_dropout = nn.Dropout(config.attn_pdrop), nn.Dropout(config.resid_pdrop)

  def forward(self, x: torch.Tensor, z: torch.Tensor, additive_mask: torch.Tensor) -> torch.Tensor:
    """x = ln_1 output (N, T, E), z (N, E), additive_mask (N, 1, 1, 1 + T) → (N, T, E). Keys/values
    [image; words]; query i sees key j iff j ≤ i + 1 (the buffer's rows 1..T); forbidden scores REPLACED by
    −1e4, then the padding mask ADDED."""
    n, t, d = x.shape
    q, k, v = self.c_attn(x).split(d, dim=2)
    k = torch.cat([self.uk(z)[:, None], k], 1)
    v = torch.cat([self.uv(z)[:, None], v], 1)
    split = lambda y: y.view(n, -1, self.n_head, d // self.n_head).transpose(1, 2)  # noqa: E731
    q, k, v = split(q), split(k), split(v)
    s = torch.matmul(q, k.transpose(-1, -2)) / (d // self.n_head) ** 0.5
    causal = self.causal_mask[:, :, 1:t + 1, :t + 1].bool()
    s = torch.where(causal, s, self.mask_out_value.to(s.dtype)) + additive_mask
    o = torch.matmul(self.attn_dropout(torch.softmax(s, dim=-1)), v).transpose(1, 2).reshape(n, t, d)
    return self.resid_dropout(self.c_proj(o))


class PseudoSelfAttentionGPT2(transformers.GPT2LMHeadModel):
  """An HF ``GPT2LMHeadModel`` whose blocks' attention is ``GPT2PseudoAttention`` and whose forward is §6.3
  (no cache: ``generate(..., prefix=z, use_cache=False)`` re-runs the whole sequence every step)."""

  def __init__(self, config: transformers.GPT2Config):
    super().__init__(config)
    for block in self.transformer.h:
      block.attn = GPT2PseudoAttention(block.attn, config)

  def forward(self, input_ids: torch.Tensor, prefix: torch.Tensor, attention_mask: torch.Tensor | None = None,
              **kwargs) -> CausalLMOutputWithCrossAttentions:
    """ids (N, T), prefix z (N, E), attention_mask (N, T) (None = ones) → logits (N, T, V): ``wte[ids] + wte[t]``
    (the position quirk), padding mask ``(1 − [1, m])·(−1e4)``."""
    del kwargs
    tr = self.transformer
    n, t = input_ids.shape
    x = tr.drop(tr.wte(input_ids) + tr.wte(torch.arange(t, device=input_ids.device)))
    mask = torch.ones(n, t, dtype=x.dtype) if attention_mask is None else attention_mask.to(x.dtype)
    additive = (1.0 - torch.cat([torch.ones(n, 1, dtype=x.dtype), mask], 1))[:, None, None, :] * MASK_OUT_VALUE
    for block in tr.h:
      x = x + block.attn(block.ln_1(x), prefix.to(x.dtype), additive)
      x = x + block.mlp(block.ln_2(x))
    return CausalLMOutputWithCrossAttentions(logits=self.lm_head(tr.ln_f(x)))


class LanguageModel(nn.Module):
  """RGRG's ``LanguageModel`` as CT-AGRG keeps it (§6.1, §10.4): ``gpt_with_lm_head`` plus the extra references
  ``gpt`` (= its transformer), ``lm_head``, ``wte``, ``wpe``, ``gpt2_blocks`` ({ln_1, attn, ln_2, mlp} per layer),
  ``final_layernorm`` — the same tensors again in the state_dict — and ``feature_space_transformation_nn``."""

  def __init__(self, config: transformers.GPT2Config, num_abnormalities: int = 18, abnormality_dim: int = 1024,
               fst_hidden=(4096, 1024)):
    super().__init__()
    self.gpt_with_lm_head = PseudoSelfAttentionGPT2(config)
    self.gpt = self.gpt_with_lm_head.transformer
    self.lm_head = self.gpt_with_lm_head.lm_head
    self.wte, self.wpe = self.gpt.wte, self.gpt.wpe
    self.gpt2_blocks = nn.ModuleList(nn.ModuleList([b.ln_1, b.attn, b.ln_2, b.mlp]) for b in self.gpt.h)
    self.final_layernorm = self.gpt.ln_f
    self.feature_space_transformation_nn = feature_space_transformation_nn(
        num_abnormalities * abnormality_dim, fst_hidden, config.n_embd)

  def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """ids / mask (N, T), block vectors c (N, K·d) → logits (N, T, V)."""
    z = self.feature_space_transformation_nn(c)
    return self.gpt_with_lm_head(input_ids, prefix=z, attention_mask=attention_mask).logits


class ReportGenerationModel(nn.Module):
  """CT-AGRG's stage-2 model (§6.1): ``visual_encoder`` (``CTNetStep``), ``language_model``; ``thresholds`` a plain
  float32 attribute (not in the state_dict)."""

  def __init__(self, visual_encoder: CTNetStep, language_model: LanguageModel, thresholds):
    super().__init__()
    self.visual_encoder, self.language_model = visual_encoder, language_model
    self.thresholds = torch.as_tensor(thresholds, dtype=torch.float32)

  def forward(self, volumes: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor, masks: torch.Tensor):
    """§6.2 / §6.4 as coded: volumes (B, 1, D, H, W), labels (B, K), targets / masks (B, K, T) (T = the collate's
    length) → −1 when no pair is valid, else (loss, {"valid" (B, K), "lm_logits" (N, T, V), "z" (N, E)})."""
    with torch.no_grad():
      h, logits = self.visual_encoder(volumes)
    valid = (torch.sigmoid(logits) > self.thresholds.to(logits.dtype)) & (labels == 1)
    if not bool(valid.any()):
      return -1
    ids, m = targets[valid], masks[valid]
    c = block_vector(h[valid], valid.nonzero(as_tuple=True)[1], valid.shape[1])
    z = self.language_model.feature_space_transformation_nn(c)
    out = self.language_model(ids, m, c)
    tokens = ids[:, 1:].masked_fill(m[:, 1:] == 0, -100)
    ce = nn.functional.cross_entropy(out[:, :-1].reshape(-1, out.shape[-1]), tokens.reshape(-1), ignore_index=-100,
                                     reduction="none")
    return ce.mean(), {"valid": valid, "lm_logits": out, "z": z}


def rgrg_beam_search(next_logits, *, eos: int, num_beams: int, max_length: int) -> tuple[list[int], float]:
  """§7.1: RGRG's loop over transformers 4.53's ``BeamSearchScorer`` (no ``decoder_prompt_len``,
  ``length_penalty`` 1, ``early_stopping`` False) for one problem from ``[eos]``. ``next_logits(ids (K, L))`` →
  the next-token logits (K, V). Returns the best hypothesis (BOS included, the closing EOS not) and its score."""
  ids = torch.full((num_beams, 1), eos, dtype=torch.long)
  running = torch.zeros(num_beams, dtype=torch.float32)
  running[1:] = -1e9
  hyps: list[tuple[float, list[int]]] = []
  worst = 1e9

  def add(tokens: list[int], total: float, length: int) -> None:
    nonlocal worst
    score = total / length
    if len(hyps) < num_beams or score > worst:
      hyps.append((score, tokens))
      if len(hyps) > num_beams:
        ranked = sorted((s, i) for i, (s, _) in enumerate(hyps))
        del hyps[ranked[0][1]]
        worst = ranked[1][0]
      else:
        worst = min(score, worst)

  done = False
  while True:
    cur_len = ids.shape[1] + 1
    logp = torch.log_softmax(next_logits(ids).float(), dim=-1)
    vocab = logp.shape[-1]
    top, flat = torch.topk((logp + running[:, None]).view(-1), 2 * num_beams)
    scores, tokens, sources = [], [], []
    for rank, (s, i) in enumerate(zip(top.tolist(), flat.tolist())):
      src, tok = divmod(i, vocab)
      if tok == eos:
        if rank < num_beams:
          add(ids[src].tolist(), s, cur_len)
      else:
        scores.append(s)
        tokens.append(tok)
        sources.append(src)
      if len(scores) == num_beams:
        break
    done = done or (len(hyps) >= num_beams and worst >= top.max().item() / cur_len)
    running = torch.tensor(scores, dtype=torch.float32)
    ids = torch.cat([ids[sources], torch.tensor(tokens)[:, None]], 1)
    if done or ids.shape[1] >= max_length:
      break
  if not done:
    for j in range(num_beams):
      add(ids[j].tolist(), running[j].item(), ids.shape[1])
  score, tokens = sorted(hyps, key=lambda x: x[0])[-1]
  return tokens, score
