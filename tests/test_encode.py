"""``d2v encode`` and ``d2v.inference``: files, folders and manifests -> embeddings with keys.

A tiny three-modality model folder (byte-level text tokenizer) and small generated inputs;
the converted fairseq fixtures too. Checked: shapes and keys, agreement with the model's own
``extract_features``, layer and pooling choices, batch independence (audio clips of different
lengths, padded text), .npy/.parquet round trips, and the refusals (wrong modality, unreadable
files, wrong sample rate, bad layer) naming the file.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from d2v.errors import InputError
from d2v.inference import Encoder, encode, encode_texts, write_embeddings
from d2v.inference.encode import read_embeddings
from d2v.models import Data2Vec2
from d2v.models.model_dir import save_model_dir

FX = Path(__file__).parent / "fixtures" / "fairseq"
LINES = ["In the beginning God created the heaven and the earth.", "Short.",
         "And the earth was without form, and void; and darkness was upon the face of the deep."]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_cfg):
    torch.manual_seed(3)
    model = Data2Vec2(tiny_cfg("image", "speech", "text", text={"vocab_size": 260}))
    return save_model_dir(model, tmp_path_factory.mktemp("enc") / "model", tokenizer="bytes", source="test")


@pytest.fixture(scope="module")
def enc(model_dir):
    return Encoder.load(model_dir, device="cpu")


def _png(path: Path, seed: int, size=(28, 28), mode="L") -> Path:
    from PIL import Image

    rng = np.random.default_rng(seed)
    shape = size[::-1] + ((3,) if mode == "RGB" else ())
    Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode).save(path)
    return path


def _flac(path: Path, n: int, seed: int, sr: int = 16000) -> Path:
    import soundfile as sf

    rng = np.random.default_rng(seed)
    sf.write(path, (rng.standard_normal(n) * 0.1).astype(np.float32), sr, format="WAV" if path.suffix == ".wav" else "FLAC")
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    (d / "img").mkdir()
    for i in range(5):
        _png(d / "img" / f"im{i}.png", i)
    _png(d / "img" / "rgb.png", 9, size=(40, 30), mode="RGB")
    (d / "img" / "notes.csv").write_text("x\n")  # other files in a folder are ignored
    (d / "aud").mkdir()
    for i, n in enumerate([8000, 9600, 8000, 12000]):
        _flac(d / "aud" / f"a{i}.flac", n, i)
    (d / "lines.txt").write_text("\n".join([LINES[0], "", LINES[1], LINES[2]]) + "\n")
    return d


# ------------------------------------------------------------------------------------ basics
def test_images_match_extract_features(enc, data):
    res = encode(enc, data / "img")
    assert res.modality == "image" and res.embeddings.shape == (6, 32) and res.embeddings.dtype == np.float32
    assert res.keys == ["im0.png", "im1.png", "im2.png", "im3.png", "im4.png", "rgb.png"]
    from d2v.inference.inputs import Item

    x = torch.stack([enc.prepare(Item("k", "image", data / "img" / f"im{i}.png")) for i in range(5)])
    ref = enc.model.extract_features(x, "image")["x"].mean(1).numpy()
    np.testing.assert_allclose(res.embeddings[:5], ref, rtol=1e-5, atol=1e-6)
    # the ImageCollate normalisation: grey pixels / 255, (x - 0.2860) / 0.3530
    from PIL import Image

    raw = np.asarray(Image.open(data / "img" / "im0.png"), dtype=np.float32) / 255
    np.testing.assert_allclose(x[0, 0].numpy(), (raw - 0.2860) / 0.3530, rtol=1e-6, atol=1e-6)


def test_layers_and_poolings(enc, data):
    last = encode(enc, data / "img", layer=-1)
    assert np.array_equal(last.embeddings, encode(enc, data / "img", layer=2).embeddings)
    first = encode(enc, data / "img", layer=0)
    assert not np.allclose(first.embeddings, last.embeddings)
    tok = encode(enc, data / "img", pooling="tokens")
    assert [t.shape for t in tok.embeddings] == [(49, 32)] * 6
    np.testing.assert_allclose(np.stack([t.mean(0) for t in tok.embeddings]), last.embeddings, rtol=1e-5, atol=1e-6)
    cls = encode(enc, data / "img", pooling="cls")
    assert cls.embeddings.shape == (6, 32)
    with pytest.raises(InputError, match="layer 3 out of range: the model has 3 blocks"):
        encode(enc, data / "img", layer=3)
    with pytest.raises(InputError, match="pooling 'cls' needs a CLS token"):
        encode(enc, data / "lines.txt", pooling="cls")


def test_audio_embeddings_do_not_depend_on_the_batch(enc, data):
    res = encode(enc, data / "aud", batch_size=8)
    assert res.keys == ["a0.flac", "a1.flac", "a2.flac", "a3.flac"] and res.embeddings.shape == (4, 32)
    for i in range(4):
        one = encode(enc, data / "aud" / f"a{i}.flac")
        np.testing.assert_allclose(one.embeddings[0], res.embeddings[i], rtol=1e-5, atol=1e-6)
    tok = encode(enc, data / "aud", pooling="tokens")
    frames = [enc.model.encoder("speech").num_tokens((n,)) for n in (8000, 9600, 8000, 12000)]
    assert [t.shape[0] for t in tok.embeddings] == frames


def test_text_lines_padding_changes_nothing(enc, data):
    res = encode(enc, data / "lines.txt", batch_size=3)
    assert res.keys == ["lines.txt:1", "lines.txt:3", "lines.txt:4"]  # the empty line 2 is skipped
    for i, line in enumerate(LINES):
        one = encode_texts(enc, [line])
        np.testing.assert_allclose(one.embeddings[0], res.embeddings[i], rtol=1e-5, atol=1e-6)
    tok = encode_texts(enc, LINES, keys=["a", "b", "c"], pooling="tokens")
    # <s> + bytes, truncated to max_source_positions (64)
    assert [t.shape[0] for t in tok.embeddings] == [min(64, 1 + len(s.encode())) for s in LINES] == [55, 7, 64]


def test_manifests_and_idx(enc, tmp_path, data):
    # an IDX image file, as Fashion-MNIST ships, and a manifest pointing into it
    raw = tmp_path / "raw" / "image"
    (raw / "idx").mkdir(parents=True)
    imgs = np.random.default_rng(0).integers(0, 255, (4, 28, 28), dtype=np.uint8)
    (raw / "idx" / "t10k-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 0x803, 4, 28, 28) + imgs.tobytes())
    (raw / "manifest").mkdir()
    (raw / "manifest" / "test.csv").write_text(
        "key,split,label,path,offset,width,height\n" + "".join(f"k{i},test,x,idx/t10k-images-idx3-ubyte,{i},28,28\n" for i in (2, 0)))
    res = encode(enc, raw / "manifest" / "test.csv")
    assert res.keys == ["k2", "k0"]
    whole = encode(enc, raw / "idx" / "t10k-images-idx3-ubyte")
    assert whole.keys[0] == "t10k-images-idx3-ubyte:0"
    np.testing.assert_allclose(res.embeddings, whole.embeddings[[2, 0]], rtol=1e-5, atol=1e-6)
    # text and audio manifests
    tm = tmp_path / "text.csv"
    tm.write_text("key,split,label,path,text,n_chars,source\nt1,test,,x.txt,\"Hello, world\",12,x\n")
    assert encode(enc, tm).keys == ["t1"]
    am = tmp_path / "speech.csv"
    am.write_text(f"key,split,label,path,duration,sample_rate,voice,synth\ns1,test,yes,{data / 'aud' / 'a1.flac'},0.6,16000,v,s\n")
    assert encode(enc, am).embeddings.shape == (1, 32)


def test_outputs_roundtrip(enc, data, tmp_path):
    for pooling in ("mean", "tokens"):
        res = encode(enc, data / "aud", pooling=pooling)
        for suffix in (".npy", ".parquet"):
            files = write_embeddings(res, tmp_path / f"e_{pooling}{suffix}")
            assert all(f.is_file() for f in files)
            keys, embs, meta = read_embeddings(files[0])
            assert keys == res.keys and meta["pooling"] == pooling and meta["modality"] == "speech"
            if pooling == "mean":
                assert np.array_equal(embs, res.embeddings)
            else:
                assert all(np.array_equal(a, b) for a, b in zip(embs, res.embeddings))
    with pytest.raises(InputError, match="must end in .npy or .parquet"):
        write_embeddings(res, tmp_path / "e.csv")


# ------------------------------------------------------------------------------------ refusals
def test_bad_inputs_name_the_file(enc, data, tmp_path):
    wav8k = _flac(tmp_path / "slow.wav", 8000, 0, sr=8000)
    with pytest.raises(InputError, match=r"slow.wav: sample rate 8000 Hz, the model expects 16000 Hz"):
        encode(enc, wav8k)
    with pytest.raises(InputError, match=r"a0.flac: holds audio input, but image was asked for"):
        encode(enc, data / "aud" / "a0.flac", modality="image")
    disguised = tmp_path / "photo.png"
    disguised.write_bytes((data / "aud" / "a0.flac").read_bytes())
    with pytest.raises(InputError, match=r"photo.png: holds audio, not an image"):
        encode(enc, disguised)
    tiny = _flac(tmp_path / "tiny.flac", 300, 0)
    with pytest.raises(InputError, match=r"tiny.flac: 300 samples is too short"):
        encode(enc, tiny)
    with pytest.raises(InputError, match=r"missing.png: no such file"):
        encode(enc, tmp_path / "missing.png")
    odd = tmp_path / "blob.bin"
    odd.write_bytes(b"\x00\x01\x02")
    with pytest.raises(InputError, match=r"blob.bin: unknown file type"):
        encode(enc, odd)
    bad_dir = tmp_path / "imgs"
    bad_dir.mkdir()
    _png(bad_dir / "ok.png", 1)
    (bad_dir / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    with pytest.raises(InputError, match=r"broken.png: cannot decode image"):
        encode(enc, bad_dir)
    res = encode(enc, bad_dir, on_error="skip")
    assert res.keys == ["ok.png"] and res.skipped[0][0] == "broken.png" and "broken.png" in res.skipped[0][1]
    with pytest.raises(InputError, match=r"no speech files in this folder"):
        encode(enc, bad_dir, modality="speech")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    _png(mixed / "a.png", 0)
    _flac(mixed / "b.flac", 8000, 0)
    with pytest.raises(InputError, match=r"mixed: holds image, speech files; choose one"):
        encode(enc, mixed)


def test_model_of_one_modality_refuses_others(tmp_path, data):
    from d2v.models.model_dir import convert_fairseq

    out = convert_fairseq(FX / "checkpoints" / "audio_set_a.pt", tmp_path / "audio_model")
    with pytest.raises(InputError, match=r"im0.png: holds an image input, but speech was asked for"):
        encode(out, data / "img" / "im0.png", device="cpu")
    with pytest.raises(InputError, match=r"the model encodes only speech"):
        encode(out, data / "img", modality="image", device="cpu")
    res = encode(out, data / "aud", device="cpu")
    assert res.embeddings.shape == (4, 32)


def test_converted_fixtures_encode(tmp_path, data):
    """Converted fairseq fixtures encode their modality; image: ImageNet preprocessing (3 x 56 x 56)."""
    from d2v.models.model_dir import convert_fairseq

    ref = torch.load(FX / "text.pt", weights_only=True)
    d = tmp_path / "dict.txt"
    d.write_text("".join(f"{s} 1\n" for s in ref["dictionary"]["symbols"][4:-1]))
    im = convert_fairseq(FX / "checkpoints" / "image_set_a.pt", tmp_path / "im")
    e = Encoder.load(im, device="cpu")
    assert e.image_pre["resize"] == 64 and len(e.image_pre["mean"]) == 3
    from d2v.inference.inputs import Item

    x = e.prepare(Item("k", "image", data / "img" / "rgb.png"))
    assert tuple(x.shape) == (3, 56, 56)
    assert encode(e, data / "img").embeddings.shape == (6, 32)
    tx = convert_fairseq(FX / "checkpoints" / "text_set_a_cfg_dictconfig.pt", tmp_path / "tx", dictionary=d)
    lines = tmp_path / "w.txt"
    lines.write_text("w0 w1 w2 w44\nw3 unknown w5\n")
    res = encode(tx, lines, pooling="tokens", device="cpu")
    assert [t.shape for t in res.embeddings] == [(6, 32), (5, 32)]  # <s> ... </s>
    # the fixture's own text input, through the dictionary, gives fairseq's features
    tok = Encoder.load(tx, device="cpu").tokenizer
    ids = ref["net_input"]["source"][0]
    words = [ref["dictionary"]["symbols"][i] for i in ids.tolist() if i > 3]
    assert tok(" ".join(words))[1:-1] == [i for i in ids.tolist() if i > 3]


def test_cli_encode(model_dir, data, tmp_path, capsys):
    from d2v.cli.main import main

    out = tmp_path / "e.parquet"
    assert main(["encode", str(model_dir), str(data / "lines.txt"), "--out", str(out), "--no-progress", "--layer", "1"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["items"] == 3 and summary["modality"] == "text" and summary["layer"] == 1
    keys, embs, _ = read_embeddings(out)
    assert keys == ["lines.txt:1", "lines.txt:3", "lines.txt:4"] and embs.shape == (3, 32)
    assert main(["encode", str(model_dir), str(data / "aud"), "--out", str(tmp_path / "a.npy"), "--pooling", "tokens",
                 "--no-progress"]) == 0
    assert (tmp_path / "a.keys.json").is_file()
    capsys.readouterr()
    assert main(["encode", str(model_dir), str(data / "aud" / "a0.flac"), "--modality", "text", "--out",
                 str(tmp_path / "x.npy")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "a0.flac: holds audio input, but text was asked for" in err[0]
    assert main(["encode", str(tmp_path / "nomodel"), str(data / "aud"), "--out", str(tmp_path / "x.npy")]) == 2
    assert "nomodel: no such model folder or checkpoint file" in capsys.readouterr().err


def test_cli_encode_split_default_data(model_dir, tmp_path, capsys):
    """``--split`` reads data/raw/<modality>/manifest/<split>.csv under --data-root."""
    from d2v.cli.main import main

    root = tmp_path / "data"
    (root / "raw" / "text" / "manifest").mkdir(parents=True)
    (root / "raw" / "text" / "manifest" / "test.csv").write_text(
        "key,split,label,path,text,n_chars,source\n" + "".join(f"t{i},test,,x.txt,{s!r},1,x\n" for i, s in enumerate(LINES)))
    out = tmp_path / "t.npy"
    assert main(["encode", str(model_dir), "--modality", "text", "--split", "test", "--data-root", str(root),
                 "--out", str(out), "--no-progress", "--limit", "2"]) == 0
    assert json.loads(out.with_suffix(".keys.json").read_text())["keys"] == ["t0", "t1"]
    assert main(["encode", str(model_dir), "--split", "test", "--data-root", str(root), "--out", str(out)]) == 2
    assert "choose one with --modality" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_bf16_close_to_cpu(model_dir, data):
    cpu = encode(Encoder.load(model_dir, device="cpu"), data / "img")
    gpu_enc = Encoder.load(model_dir, device="cuda")
    assert gpu_enc.bf16
    gpu = encode(gpu_enc, data / "img")
    cos = (cpu.embeddings * gpu.embeddings).sum(1) / np.linalg.norm(cpu.embeddings, axis=1) / np.linalg.norm(gpu.embeddings, axis=1)
    assert cos.min() > 0.99
    fp32 = encode(Encoder.load(model_dir, device="cuda", precision="fp32"), data / "img")
    np.testing.assert_allclose(fp32.embeddings, cpu.embeddings, rtol=1e-3, atol=1e-4)


def test_gpt2_bpe_tokenizer(tmp_path):
    """fairseq's GPT-2 BPE path: bytes -> unicode, merges by rank, encoder.json ids -> dict.txt ids."""
    from d2v.inference.tokenizers import load_tokenizer

    enc_json = {"h": 0, "e": 1, "l": 2, "o": 3, "Ġ": 4, "w": 5, "r": 6, "d": 7, "he": 8, "ll": 9, "hell": 10,
                "hello": 11, "Ġw": 12, "Ġwo": 13, "Ġwor": 14, "Ġworld": 15, "or": 16, "ld": 17, "!": 18}
    (tmp_path / "encoder.json").write_text(json.dumps(enc_json))
    merges = ["h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "l d", "Ġwor ld"]
    (tmp_path / "vocab.bpe").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    # dict.txt lists BPE ids (as strings) by frequency: its order, not the BPE id, gives the model id
    (tmp_path / "dict.txt").write_text("15 100\n11 90\n18 5\n")
    tok = load_tokenizer({"type": "fairseq_dict", "path": str(tmp_path / "dict.txt"), "bpe": "gpt2"}, 8, "test")
    assert tok("hello world!") == [0, 5, 4, 6, 2]  # <s> hello Ġworld ! </s>
    assert tok("hello wor") == [0, 5, 3, 2]  # 'Ġwor' (id 14) is not in dict.txt -> <unk>
