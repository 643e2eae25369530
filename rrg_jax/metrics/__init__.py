"""Report metrics: ``text`` (BLEU/METEOR/ROUGE-L/CIDEr as in the official code, sacreBLEU) and ``clinical``
(offline CheXpert-style labeler and clinical-efficacy precision/recall/F1)."""
