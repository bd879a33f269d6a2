"""CTC speech recognition (``finetune.speech.head=ctc``): letters, decoding, scores, a model that
learns transcripts on a fixed batch, save/load, the config check and bad transcripts."""

from __future__ import annotations

import pytest
import torch
from conftest import SPEECH_SAMPLES, build_cfg

from d2v.config import TaskConfig
from d2v.data.downstream import LabelledSplit
from d2v.errors import ConfigError, InputError
from d2v.models import Data2Vec2
from d2v.models.ctc import BLANK, LETTERS, ctc_loss, decode_letters, encode_letters, error_rates, reference
from d2v.models.heads import CTCRecognizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_letters_round_trip_through_best_path_decoding():
    ids = encode_letters("Don't   stop, Marvin!")
    assert "".join(LETTERS[i] for i in ids) == "DON'T|STOP|MARVIN"  # punctuation dropped, one boundary per gap
    # a best path: blanks anywhere, each letter repeated over frames; a blank separates a true double letter
    path = [BLANK]
    for i in encode_letters("all"):
        path += [i, i, BLANK]
    assert decode_letters(path) == "ALL"
    assert decode_letters([BLANK, 3, 3, 3, BLANK]) == "A"  # repeats without a blank merge
    assert reference("  don't stop ") == "DON'T STOP"
    with pytest.raises(InputError, match="clip-7: transcript '!!' has no letters"):
        encode_letters("!!", "clip-7")


def test_error_rates_match_hand_counts():
    wer, cer = error_rates(["HELLO WORLD", "UP"], ["HELLO WORD", "UP"])
    assert wer == pytest.approx(1 / 3)  # one substituted word of 3 reference words
    assert cer == pytest.approx(1 / 12)  # one deleted letter of 12 reference characters ("HELLO WORD" + "UP")


def _model(seed: int = 0) -> CTCRecognizer:
    torch.manual_seed(seed)
    return CTCRecognizer(Data2Vec2(build_cfg("speech")), freeze_local=False)


def test_a_transcript_longer_than_its_clip_is_a_clear_error():
    model = _model()
    wav = torch.randn(1, SPEECH_SAMPLES)
    frames = model.frames(wav, None)
    with pytest.raises(InputError, match="clip-x: transcript longer than the clip's 24 frames"):
        ctc_loss(model(wav), frames, ["A" * 40], ["clip-x"])


TONE = {"U": 300.0, "P": 700.0, "G": 1300.0, "O": 2100.0, "N": 3100.0}


def say(word: str) -> torch.Tensor:
    """A toy utterance: one tone per letter, in turn, so its sounds follow its letters (O is shared)."""
    n = SPEECH_SAMPLES // len(word)
    t = torch.arange(n) / 16000
    return torch.cat([torch.sin(2 * torch.pi * TONE[c] * t) for c in word] + [torch.zeros(SPEECH_SAMPLES - n * len(word))])


def test_ctc_learns_the_transcripts_of_a_fixed_batch():
    """Three toy utterances: the CTC loss falls and greedy decoding gives the words back."""
    words = ["UP", "GO", "NO"]
    wav = torch.stack([say(w) for w in words]) + 0.1 * torch.randn(3, SPEECH_SAMPLES, generator=torch.Generator().manual_seed(1))
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.eval()
    assert model.transcribe(wav) != words
    model.train()
    losses = []
    for _ in range(400):
        loss = ctc_loss(model(wav), model.frames(wav, None), words, ["a", "b", "c"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.01 * losses[0]
    model.eval()
    assert model.transcribe(wav) == words


def test_padding_limits_the_frames_and_the_decoded_path():
    model = _model().eval()
    wav = torch.randn(2, SPEECH_SAMPLES)
    frames = model.frames(wav, torch.tensor([SPEECH_SAMPLES, SPEECH_SAMPLES // 2]))
    assert frames[0] == 24 and 0 < frames[1] < 24
    assert model(wav).shape == (2, 24, len(LETTERS))


def test_ctc_model_saves_and_loads_as_a_classifier_folder(tmp_path):
    from d2v.models.classifier_dir import load_classifier, save_classifier

    model = _model().eval()
    wav = torch.randn(2, SPEECH_SAMPLES)
    save_classifier(model, tmp_path / "ctc", {"task": "speech", "labels": []})
    back, meta = load_classifier(tmp_path / "ctc")
    assert meta["head"] == "ctc" and isinstance(back, CTCRecognizer)
    torch.testing.assert_close(back.eval()(wav), model(wav))


def test_word_accuracy_and_scores():
    from d2v.models.ctc import error_rates

    model = _model().eval()
    data = LabelledSplit("speech", "test", torch.randn(3, SPEECH_SAMPLES), torch.tensor([0, 1, 2]), ["a", "b", "c"],
                         torch.tensor([SPEECH_SAMPLES, SPEECH_SAMPLES, SPEECH_SAMPLES // 2]), ["up", "go", "no way"])
    scores = model.score([data], torch.device("cpu"))
    refs = [r for r, _ in scores["examples"]]
    hyps = model.transcribe(data.source, data.lengths)
    assert refs == ["UP", "GO", "NO WAY"] and [h for _, h in scores["examples"]] == hyps
    assert scores["samples"] == 3
    assert (scores["wer"], scores["cer"]) == pytest.approx(error_rates(hyps, refs))
    assert scores["accuracy"] == pytest.approx(1 - scores["wer"]) and 0 <= scores["cer"]
    # counts are additive: the same clips in two batches score exactly as in one
    parts = [LabelledSplit("speech", "test", data.source[i], data.label[i], [data.keys[j] for j in i.tolist()],
                           data.lengths[i], [data.texts[j] for j in i.tolist()]) for i in (torch.tensor([0]), torch.tensor([1, 2]))]
    split = model.score(parts, torch.device("cpu"))
    assert (split["wer"], split["cer"], split["samples"]) == (scores["wer"], scores["cer"], 3)
    cropped = LabelledSplit("speech", "train", data.source, data.label, data.keys, data.lengths, data.texts, cropped=1)
    with pytest.raises(InputError, match="1 clip\\(s\\) longer than finetune.speech.audio_seconds"):
        model.score([cropped], torch.device("cpu"))
    with pytest.raises(InputError, match="1 clip\\(s\\) longer than finetune.speech.audio_seconds"):
        model.check_data(cropped)  # what training checks at each step
    silent = LabelledSplit("speech", "test", data.source, data.label, ["a", "clip-b", "c"], data.lengths,
                           ["up", "...", "no"])
    with pytest.raises(InputError, match="clip-b: transcript '...' has no letters"):
        model.score([silent], torch.device("cpu"))
    with pytest.raises(InputError, match="has no transcripts"):
        model.score([LabelledSplit("speech", "test", data.source, data.label, data.keys, data.lengths)],
                    torch.device("cpu"))


def test_librispeech_subsets_are_scored_on_their_own():
    """A LibriSpeech test split holds test-clean and test-other (dev: dev-clean and dev-other), and
    papers report each: the collate tags every clip by the subset in its path, and the CTC scores
    give ``wer_<subset>`` computed on that subset's clips alone, additive over batches and ranks."""
    import io
    import json

    import numpy as np
    import soundfile as sf

    from d2v.data.downstream import TaskInputs
    from d2v.models.ctc import EVAL_SUBSETS, subset_index

    assert subset_index("LibriSpeech/test-other/1/2/1-2-0003.flac") == EVAL_SUBSETS.index("test-other")
    assert subset_index("LibriSpeech/train-clean-100/1/2/x.flac") == -1 and subset_index("words/up.flac") == -1
    rng = np.random.default_rng(0)
    paths = ["LibriSpeech/test-clean/1/1/a.flac", "LibriSpeech/test-other/2/2/b.flac",
             "LibriSpeech/test-other/3/3/c.flac", "espeak/d.flac"]
    samples = []
    for i, (path, text) in enumerate(zip(paths, ["up", "go left", "no way", "stop"])):
        buf = io.BytesIO()
        sf.write(buf, (rng.standard_normal(SPEECH_SAMPLES - 500 * i) * 3000).astype(np.int16), 16000, format="FLAC")
        samples.append({"__key__": f"k{i}", "cls": -1, "flac": buf.getvalue(),
                        "json": json.dumps({"label": text, "path": path}).encode()})
    inputs = TaskInputs("speech", audio_seconds=SPEECH_SAMPLES / 16000, pad_to_longest=True)
    batch = inputs.collate(samples, "test")
    assert batch.subset.tolist() == [2, 3, 3, -1]
    model = _model().eval()
    batches = [inputs.collate(samples[:2], "test"), inputs.collate(samples[2:], "test")]
    hyps = [h for b in batches for h in model.transcribe(b.source, b.lengths)]
    refs = [reference(t) for t in batch.texts]
    scores = model.score(batches, torch.device("cpu"))
    assert scores["wer"] == pytest.approx(error_rates(hyps, refs)[0])
    assert (scores["wer_test_clean"], scores["cer_test_clean"]) == pytest.approx(error_rates(hyps[:1], refs[:1]))
    assert (scores["wer_test_other"], scores["cer_test_other"]) == pytest.approx(error_rates(hyps[1:3], refs[1:3]))
    assert not any(k.startswith(("wer_dev", "cer_dev")) for k in scores)
    assert "test-other" in model.describe(scores)


def test_ctc_loss_from_the_head_matches_the_letter_loss():
    """``head.loss(head(x), head.targets(batch))`` is ``ctc_loss`` on the same frames and texts."""
    model = _model().eval()
    data = LabelledSplit("speech", "train", torch.randn(3, SPEECH_SAMPLES), torch.tensor([0, 1, 2]), ["a", "b", "c"],
                         torch.tensor([SPEECH_SAMPLES, SPEECH_SAMPLES // 2, SPEECH_SAMPLES]), ["up", "go", "no"])
    idx = torch.tensor([2, 1])
    src, lengths = data.source[idx], data.lengths[idx]
    with torch.no_grad():
        out = model(src, lengths)
        want = ctc_loss(out, model.frames(src, lengths), ["no", "go"], ["c", "b"])
        batch = LabelledSplit("speech", "train", src, data.label[idx], ["c", "b"], lengths, ["no", "go"])
        assert torch.equal(model.loss(out, model.targets(batch)), want)


@pytest.mark.parametrize("task,head,msg", [("image", "ctc", "for the speech task only"),
                                           ("speech", "rnnt", "must be 'classify' or 'ctc'")])
def test_head_is_checked(task, head, msg):
    from d2v.config import load_config

    with pytest.raises(ConfigError, match=msg):
        load_config([f"finetune.{task}.head={head}"], config_name="pipeline")
    assert TaskConfig().head == "classify"
