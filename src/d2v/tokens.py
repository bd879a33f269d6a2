"""The special token ids of the project's text vocabulary (as fairseq's dictionary).

One owner for both sides: ``d2v.data.tokenizer`` trains sentencepiece with them and the models
(``d2v.models.baselines``) use them, without the models importing the data package.
"""

BOS, PAD, EOS, UNK = 0, 1, 2, 3
