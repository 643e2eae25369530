"""Text metrics (rrg_jax.metrics.text) against hand-computed values and independent mini implementations."""

from __future__ import annotations

import collections
import math

import pytest

from rrg_jax.metrics import text

GTS = {"a": "the heart is normal . no effusion .",
       "b": "lungs are clear . there is no pneumothorax .",
       "c": "mild cardiomegaly . small left pleural effusion ."}
RES = {"a": "the heart is normal .",
       "b": "lungs are clear . no pneumothorax or effusion .",
       "c": "mild cardiomegaly . no pleural effusion . the lungs are clear ."}


@pytest.fixture(autouse=True)
def no_meteor_unless_asked(request, monkeypatch):
  """METEOR starts a JVM (~8 s); only ``test_meteor_*`` run it."""
  if not request.node.name.startswith("test_meteor"):
    monkeypatch.setattr(text, "java_available", lambda: False)
    monkeypatch.setattr(text, "_warned_no_java", True)


def ngrams(words: list[str], n: int) -> collections.Counter:
  return collections.Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))


def mini_bleu(gts: dict, res: dict, n_max: int = 4) -> list[float]:
  """Corpus BLEU with one reference each: pooled clipped n-gram precisions, brevity penalty on total lengths."""
  matches, totals = [0] * n_max, [0] * n_max
  hyp_len = ref_len = 0
  for i in gts:
    h, r = res[i].split(), gts[i].split()
    hyp_len, ref_len = hyp_len + len(h), ref_len + len(r)
    for n in range(1, n_max + 1):
      hc, rc = ngrams(h, n), ngrams(r, n)
      matches[n - 1] += sum(min(c, rc[g]) for g, c in hc.items())
      totals[n - 1] += max(len(h) - n + 1, 0)
  bp = 1.0 if hyp_len >= ref_len else math.exp(1 - ref_len / hyp_len)
  out, log_sum = [], 0.0
  for n in range(n_max):
    log_sum += math.log(matches[n] / totals[n])
    out.append(bp * math.exp(log_sum / (n + 1)))
  return out


def lcs(a: list[str], b: list[str]) -> int:
  t = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
  for i, x in enumerate(a):
    for j, y in enumerate(b):
      t[i + 1][j + 1] = t[i][j] + 1 if x == y else max(t[i][j + 1], t[i + 1][j])
  return t[-1][-1]


def mini_rouge(gts: dict, res: dict, beta: float = 1.2) -> float:
  total = 0.0
  for i in gts:
    h, r = res[i].split(), gts[i].split()
    m = lcs(h, r)
    p, rec = m / len(h), m / len(r)
    total += (1 + beta ** 2) * p * rec / (rec + beta ** 2 * p) if m else 0.0
  return total / len(gts)


def test_identical_texts_score_one():
  scores = text.compute_scores(GTS, dict(GTS))
  for n in range(1, 5):
    assert scores[f"BLEU_{n}"] == pytest.approx(1.0, abs=1e-9)
  assert scores["ROUGE_L"] == pytest.approx(1.0)
  assert scores["Cider"] == pytest.approx(10.0)  # every n-gram vector is identical: cosine 1, no length penalty
  assert scores["sacreBLEU"] == pytest.approx(100.0)


def test_bleu_and_rouge_match_mini_implementations():
  scores = text.compute_scores(GTS, RES)
  for n, want in enumerate(mini_bleu(GTS, RES), 1):
    assert scores[f"BLEU_{n}"] == pytest.approx(want, rel=1e-6)
  assert scores["ROUGE_L"] == pytest.approx(mini_rouge(GTS, RES), rel=1e-9)
  assert 0.0 < scores["Cider"] < 10.0


def test_bleu_hand_computed_single_pair():
  # hyp "a b c d" vs ref "a b c e": precisions 3/4, 2/3, 1/2, 0 -> BLEU_4 ~ 0 (coco smoothing 1e-15)
  s = text.compute_scores({"x": "a b c e"}, {"x": "a b c d"})
  assert s["BLEU_1"] == pytest.approx(0.75, rel=1e-6)
  assert s["BLEU_2"] == pytest.approx(math.sqrt(0.75 * 2 / 3), rel=1e-6)
  assert s["BLEU_3"] == pytest.approx((0.75 * 2 / 3 * 0.5) ** (1 / 3), rel=1e-6)
  assert s["BLEU_4"] < 1e-3
  # brevity: hyp "a b" vs ref "a b c d" -> BLEU_1 = exp(1 - 4/2) * 1
  s = text.compute_scores({"x": "a b c d"}, {"x": "a b"})
  assert s["BLEU_1"] == pytest.approx(math.exp(-1.0), rel=1e-6)


def test_empty_report_scores_zero_without_error():
  s = text.compute_scores({"x": "no acute disease ."}, {"x": ""})
  assert s["BLEU_1"] < 1e-6 and s["ROUGE_L"] == 0.0 and s["Cider"] == 0.0


@pytest.mark.skipif(not text.java_available(), reason="java is not installed")
def test_meteor_orders_reports():
  same = text.compute_scores(GTS, dict(GTS))["METEOR"]
  part = text.compute_scores(GTS, RES)["METEOR"]
  assert 0.95 < same <= 1.0  # only the fragmentation penalty 0.5 * (chunks / matches)^3 keeps it below 1
  assert 0.1 < part < same


def test_missing_java_warns_once_and_reports_the_rest(monkeypatch, recwarn):
  monkeypatch.setattr(text, "_warned_no_java", False)
  s = text.compute_scores(GTS, RES)
  text.compute_scores(GTS, RES)
  assert [str(w.message) for w in recwarn].count(
      "Java not found: METEOR (meteor-1.5.jar) is not computed; the other metrics are.") == 1
  assert "METEOR" not in s and {"BLEU_4", "ROUGE_L", "Cider", "sacreBLEU"} <= set(s)


def test_mismatched_ids_are_an_error():
  with pytest.raises(ValueError, match="ids differ"):
    text.compute_scores({"a": "x"}, {"b": "x"})


@pytest.mark.skipif(not text.java_available(), reason="METEOR needs Java")
def test_meteor_reads_reports_with_control_characters_and_newlines():
  """A generated report decoded from byte-level BPE may hold a newline or any control byte; the METEOR jar's line
  protocol would break on it ("Error: specify SCORE or EVAL"); the texts it reads are made one line first, which
  leaves a cleaned report unchanged."""
  refs = {"a": "the heart is normal .", "b": "no pleural effusion ."}
  messy = {"a": "the heart\n is\u0010 normal .", "b": "no\r\npleural effusion ."}
  clean = {"a": "the heart is normal .", "b": "no pleural effusion ."}
  assert text.meteor_line_safe(clean["a"]) == clean["a"]
  assert text.compute_scores(refs, messy)["METEOR"] == pytest.approx(text.compute_scores(refs, clean)["METEOR"])
