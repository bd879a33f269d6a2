"""CTC speech recognition (``finetune.speech.head=ctc``): letters, decoding, scores, a model that
learns transcripts on a fixed batch, save/load, the config check and bad transcripts."""

from __future__ import annotations

import pytest
import torch
from conftest import SPEECH_SAMPLES, build_cfg

from d2v.config import TaskConfig
from d2v.errors import ConfigError, InputError
from d2v.models import Data2Vec2
from d2v.train.ctc import BLANK, LETTERS, CTCRecognizer, ctc_loss, decode_letters, encode_letters, error_rates, reference
from d2v.train.downstream_data import LabelledSplit

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
    from d2v.train.finetune import load_classifier, save_classifier

    model = _model().eval()
    wav = torch.randn(2, SPEECH_SAMPLES)
    save_classifier(model, tmp_path / "ctc", {"task": "speech", "labels": []})
    back, meta = load_classifier(tmp_path / "ctc")
    assert meta["head"] == "ctc" and isinstance(back, CTCRecognizer)
    torch.testing.assert_close(back.eval()(wav), model(wav))


def test_word_accuracy_and_transcribe_split():
    from d2v.train.ctc import transcribe_split
    from d2v.train.finetune import accuracy

    model = _model().eval()
    data = LabelledSplit("speech", "test", torch.randn(2, SPEECH_SAMPLES), torch.tensor([0, 1]), ["a", "b"],
                         torch.tensor([SPEECH_SAMPLES] * 2), ["up", "go"])
    scores = transcribe_split(model, data, 8, torch.device("cpu"))
    assert scores["refs"] == ["UP", "GO"] and len(scores["hyps"]) == 2
    assert accuracy(model, data, 8, torch.device("cpu")) == pytest.approx(1 - scores["wer"])
    cropped = LabelledSplit("speech", "train", data.source, data.label, data.keys, data.lengths, data.texts, cropped=1)
    with pytest.raises(InputError, match="1 clip\\(s\\) are longer than finetune.speech.audio_seconds"):
        transcribe_split(model, cropped, 8, torch.device("cpu"))
    silent = LabelledSplit("speech", "test", data.source, data.label, ["a", "clip-b"], data.lengths, ["up", "..."])
    with pytest.raises(InputError, match="clip-b: transcript '...' has no letters"):
        transcribe_split(model, silent, 8, torch.device("cpu"))
    with pytest.raises(InputError, match="has no transcripts"):
        transcribe_split(model, LabelledSplit("speech", "test", data.source, data.label, data.keys, data.lengths), 8,
                         torch.device("cpu"))


@pytest.mark.parametrize("task,head,msg", [("image", "ctc", "for the speech task only"),
                                           ("speech", "rnnt", "must be 'classify' or 'ctc'")])
def test_head_is_checked(task, head, msg):
    from d2v.config import load_config

    with pytest.raises(ConfigError, match=msg):
        load_config([f"finetune.{task}.head={head}"], config_name="pipeline")
    assert TaskConfig().head == "classify"
