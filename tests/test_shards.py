"""Shards, tokenizer and loaders on small real files: written, read back equal, deterministic.

The manifests here are built by the test from real PNG/FLAC files and text lines, in the
manifest format of ``d2v.data.manifest``; the sources that build them from the real datasets
are tested in their own files.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from d2v.data import loaders, transforms
from d2v.data.manifest import manifest_path, raw_dir, write_manifest
from d2v.data.shards import shard_urls, write_shards
from d2v.data.tokenizer import BOS, EOS, PAD, UNK, train_tokenizer
from d2v.errors import InputError

SPLITS = {"train": 10, "val": 3, "test": 3}


def make_image_data(root: Path) -> dict[str, np.ndarray]:
    base = raw_dir(root, "image")
    rng = np.random.default_rng(0)
    pixels = {}
    for split, n in SPLITS.items():
        rows = []
        for i in range(n):
            key = f"img-{split}-{i}"
            arr = rng.integers(0, 256, (28, 28), dtype=np.uint8)
            rel = f"files/{key}.png"
            (base / "files").mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr).save(base / rel)
            pixels[key] = arr
            rows.append(dict(key=key, split=split, label=["cat", "dog"][i % 2], path=rel, offset=-1, width=28, height=28))
        write_manifest(manifest_path(root, "image", split), "image", rows)
    return pixels


def make_speech_data(root: Path, sr: int = 16000) -> dict[str, np.ndarray]:
    base = raw_dir(root, "speech")
    rng = np.random.default_rng(1)
    waves = {}
    for split, n in SPLITS.items():
        rows = []
        for i in range(n):
            key = f"wav-{split}-{i}"
            x = (rng.standard_normal(sr // 2 + 160 * i) * 3000).astype(np.int16)
            rel = f"audio/{key}.flac"
            (base / "audio").mkdir(parents=True, exist_ok=True)
            sf.write(base / rel, x, sr, subtype="PCM_16")
            waves[key] = x
            rows.append(dict(key=key, split=split, label="yes", path=rel, duration=len(x) / sr, sample_rate=sr, voice="v", synth="test"))
        write_manifest(manifest_path(root, "speech", split), "speech", rows)
    return waves


WORDS = "in the beginning god created the heaven and the earth and the earth was without form and void".split()


def make_text_data(root: Path) -> None:
    rng = np.random.default_rng(2)
    for split, n in SPLITS.items():
        rows = []
        for i in range(n * 5):
            text = " ".join(rng.choice(WORDS, size=12))
            rows.append(dict(key=f"txt-{split}-{i}", split=split, label=["fresh", "rotten", ""][i % 3], path="corpus.txt",
                             text=text, n_chars=len(text), source="test"))
        write_manifest(manifest_path(root, "text", split), "text", rows)


def read_tar(path: str) -> dict[str, dict[str, bytes]]:
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tf:
        for m in tf.getmembers():
            key, ext = m.name.split(".", 1)
            out.setdefault(key, {})[ext] = tf.extractfile(m).read()
    return out


def test_image_shards_round_trip_and_are_deterministic(tmp_path):
    pixels = make_image_data(tmp_path)
    s = write_shards("image", tmp_path, seed=3, maxcount=4, min_shards=2, progress=False)
    assert s["splits"]["train"] == {**s["splits"]["train"], "samples": 10, "shards": 3}  # 4 + 4 + 2
    assert s["labels"] == ["cat", "dog"]
    seen = {}
    for split in SPLITS:
        for url in shard_urls(tmp_path, "image", split):
            for key, files in read_tar(url).items():
                arr = np.asarray(Image.open(io.BytesIO(files["png"])))
                assert np.array_equal(arr, pixels[key]), key
                meta = json.loads(files["json"])
                assert meta["split"] == split and int(files["cls"]) == ["cat", "dog"].index(meta["label"])
                seen[key] = split
    assert len(seen) == sum(SPLITS.values())
    # wids index lists every shard with its sample count
    idx = json.loads((tmp_path / "shards/image/train.json").read_text())
    assert idx["__kind__"] == "wids-shard-index-v1" and sum(x["nsamples"] for x in idx["shardlist"]) == 10
    first = {u: Path(u).read_bytes() for u in shard_urls(tmp_path, "image", "train")}
    write_shards("image", tmp_path, seed=3, maxcount=4, min_shards=2, progress=False)
    assert first == {u: Path(u).read_bytes() for u in shard_urls(tmp_path, "image", "train")}, "not byte-identical"
    write_shards("image", tmp_path, seed=4, maxcount=4, min_shards=2, progress=False)
    assert first != {u: Path(u).read_bytes() for u in shard_urls(tmp_path, "image", "train")}, "seed has no effect"


def test_jpeg_and_png_files_are_kept_as_they_are_other_formats_become_png(tmp_path):
    """An ImageNet-style source: JPEG and PNG files go into the shards byte for byte (no re-encoding:
    a JPEG re-encoded as PNG is ~5x larger and ~3x slower to decode); any other format is encoded
    as PNG. Every stored image decodes to what PIL makes of the source file (CMYK and RGBA to RGB,
    16-bit grey to grey), through the loaders' decoder too."""
    base = raw_dir(tmp_path, "image")
    (base / "f").mkdir(parents=True)
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
    files = {
        "rgb.jpg": lambda p: Image.fromarray(rgb).save(p, quality=90),
        "cmyk.jpg": lambda p: Image.fromarray(rgb).convert("CMYK").save(p, format="JPEG"),
        "grey.png": lambda p: Image.fromarray(rgb[..., 0]).save(p),
        "rgba.png": lambda p: Image.fromarray(np.dstack([rgb, rgb[..., :1]])).save(p),
        "deep.png": lambda p: Image.fromarray(rgb[..., 0].astype(np.uint16) * 200).save(p),
        "anim.gif": lambda p: Image.fromarray(rgb).convert("P").save(p),
        "photo.png": lambda p: Image.fromarray(rgb).save(p, format="JPEG"),  # a JPEG named .png
    }
    rows = []
    for name, make in files.items():
        make(base / "f" / name)
        rows.append(dict(key=name.replace(".", "_"), split="train", label="a", path=f"f/{name}", offset=-1,
                         width=24, height=20))
    write_manifest(manifest_path(tmp_path, "image", "train"), "image", rows)
    for split in ("val", "test"):
        write_manifest(manifest_path(tmp_path, "image", split), "image", rows[:1])
    write_shards("image", tmp_path, seed=0, maxcount=100, min_shards=1, progress=False)
    stored = {k: v for u in shard_urls(tmp_path, "image", "train") for k, v in read_tar(u).items()}
    expect_ext = {"rgb_jpg": "jpg", "cmyk_jpg": "jpg", "grey_png": "png", "rgba_png": "png", "deep_png": "png",
                  "anim_gif": "png", "photo_png": "jpg"}
    for name in files:
        key = name.replace(".", "_")
        sample = stored[key]
        ext = expect_ext[key]
        assert ext in sample and ({"jpg", "png"} - {ext}).isdisjoint(sample), (key, sorted(sample))
        src = (base / "f" / name).read_bytes()
        assert (sample[ext] == src) == (key != "anim_gif"), key
        with Image.open(base / "f" / name) as im:
            want = np.asarray(im.convert("L" if im.mode in ("L", "I;16") else "RGB"))
        got = transforms.decode_image_uint8(transforms.image_bytes({"__key__": key, **sample}), key)
        assert got.dtype == torch.uint8 and got.shape == (want.shape[2] if want.ndim == 3 else 1, 20, 24), key
        assert np.array_equal(got.permute(1, 2, 0).squeeze(-1).numpy(), want), key
    # the pretraining loader reads them (1- and 3-channel alike, matched to the model's channels)
    collate = loaders.ImageCollate(16, 3, train=False)
    batch = collate([{"__key__": k, **v} for k, v in stored.items()])
    assert batch.source.shape == (len(files), 3, 16, 16) and torch.isfinite(batch.source).all()
    # a truncated JPEG stops the stage, naming the file
    (base / "f" / "rgb.jpg").write_bytes((base / "f" / "rgb.jpg").read_bytes()[:200])
    with pytest.raises(InputError, match=r"rgb\.jpg: cannot decode image"):
        write_shards("image", tmp_path, seed=0, maxcount=100, min_shards=1, progress=False)
    with pytest.raises(InputError, match=r"sample k: no \.jpg or \.png image"):
        transforms.image_bytes({"__key__": "k", "json": b"{}"})


def test_min_shards_splits_small_sets(tmp_path):
    make_image_data(tmp_path)
    s = write_shards("image", tmp_path, seed=0, maxcount=1000, min_shards=4, progress=False)
    assert s["splits"]["train"]["shards"] == 4  # 10 samples over >= 4 shards, not 1


def test_speech_shards_round_trip(tmp_path):
    waves = make_speech_data(tmp_path)
    write_shards("speech", tmp_path, seed=0, maxcount=5, min_shards=1, progress=False)
    for split in SPLITS:
        for url in shard_urls(tmp_path, "speech", split):
            for key, files in read_tar(url).items():
                x, sr = sf.read(io.BytesIO(files["flac"]), dtype="int16")
                assert sr == 16000 and np.array_equal(x, waves[key])


def test_wrong_sample_rate_and_corrupt_audio_name_the_file(tmp_path):
    make_speech_data(tmp_path)
    base = raw_dir(tmp_path, "speech")
    sf.write(base / "audio/wav-train-3.flac", np.zeros(8000, np.int16), 8000)
    with pytest.raises(InputError, match=r"wav-train-3\.flac: sample rate 8000"):
        write_shards("speech", tmp_path, seed=0, maxcount=5, min_shards=1, progress=False)
    make_speech_data(tmp_path)
    (base / "audio/wav-val-1.flac").write_bytes(b"fLaC" + b"\x00" * 40)  # truncated header
    with pytest.raises(InputError, match=r"wav-val-1\.flac: cannot decode audio"):
        write_shards("speech", tmp_path, seed=0, maxcount=5, min_shards=1, progress=False)
    make_speech_data(tmp_path)
    sf.write(base / "audio/wav-test-0.flac", np.zeros((8000, 2), np.int16), 16000)
    with pytest.raises(InputError, match=r"wav-test-0\.flac: 2 channels"):
        write_shards("speech", tmp_path, seed=0, maxcount=5, min_shards=1, progress=False)
    # no half-written shard is left behind, and the failed split has no index to read it through
    assert not list((tmp_path / "shards/speech").glob("*.tmp"))
    assert not (tmp_path / "shards/speech/test.json").exists()


def test_corrupt_image_names_the_file(tmp_path):
    make_image_data(tmp_path)
    (raw_dir(tmp_path, "image") / "files/img-train-2.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(InputError, match=r"img-train-2\.png: cannot decode image"):
        write_shards("image", tmp_path, seed=0, maxcount=5, min_shards=1, progress=False)


def test_tokenizer_ids_round_trip_and_text_shards(tmp_path):
    make_text_data(tmp_path)
    info = train_tokenizer(tmp_path, tmp_path / "tok", vocab_size=40, seed=1)
    assert info["ids"] == {"bos": BOS, "pad": PAD, "eos": EOS, "unk": UNK}
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "tok/spm.model"))
    line = "the earth was without form"
    assert sp.decode(sp.encode(line)) == line
    # trained on the training split only: a word only in val/test would be unknown pieces, and the
    # tokenizer.json says how many lines it saw
    assert info["train_lines"] == SPLITS["train"] * 5
    write_shards("text", tmp_path, seed=0, maxcount=20, min_shards=1, tokenizer_path=tmp_path / "tok/spm.model", progress=False)
    for url in shard_urls(tmp_path, "text", "val"):
        for _key, files in read_tar(url).items():
            ids = np.load(io.BytesIO(files["ids.npy"]))
            assert sp.decode(ids.tolist()) == files["txt"].decode()


def test_missing_tokenizer_is_a_clear_error(tmp_path):
    make_text_data(tmp_path)
    with pytest.raises(FileNotFoundError, match="d2v tokenizer"):
        write_shards("text", tmp_path, seed=0, maxcount=20, min_shards=1, tokenizer_path=tmp_path / "nope.model", progress=False)


def test_eval_loader_is_one_exact_pass(tmp_path):
    pixels = make_image_data(tmp_path)
    write_shards("image", tmp_path, seed=0, maxcount=2, min_shards=1, progress=False)
    coll = loaders.ImageCollate(28, 1, train=False, mean=0.0, std=1.0)
    keys = []
    for b in loaders.eval_loader(shard_urls(tmp_path, "image", "train"), 3, coll):
        for k, x in zip(b.keys, b.source):
            assert torch.allclose(x[0], torch.from_numpy(pixels[k]).float() / 255)
        keys += b.keys
    assert sorted(keys) == sorted(k for k in pixels if "-train-" in k)


def test_train_loader_fixed_epoch_masks_and_crop(tmp_path):
    make_speech_data(tmp_path)
    write_shards("speech", tmp_path, seed=0, maxcount=3, min_shards=1, progress=False)
    frames = lambda n: (n - 400) // 320 + 1  # noqa: E731 - stand-in frame count
    masks = lambda b, t: torch.zeros(b * 2, t, dtype=torch.bool)  # noqa: E731
    coll = loaders.SpeechCollate(16000, max_samples=6000, train=True, seed=0, mask_fn=masks, frames=frames)
    batches = list(loaders.train_loader(shard_urls(tmp_path, "speech", "train"), "speech", 4, coll, 5, seed=0))
    assert len(batches) == 5  # a fixed number of batches per epoch, whatever the shard count
    for b in batches:
        assert b.source.shape == (4, 6000)  # cropped to min(shortest clip, cap)
        # standardised per utterance before the crop (as fairseq): crops are close to mean 0, std 1
        assert float(b.source.mean(1).abs().max()) < 0.1 and float((b.source.std(1) - 1).abs().max()) < 0.2
        assert b.mask.shape == (8, frames(6000))


def test_decode_audio_standardises_the_whole_utterance():
    buf = io.BytesIO()
    sf.write(buf, (np.sin(np.arange(8000) / 5) * 9000 + 500).astype(np.int16), 16000, format="FLAC")
    x = transforms.decode_audio(buf.getvalue(), "k")
    assert abs(float(x.mean())) < 1e-5 and abs(float(x.std(unbiased=False)) - 1) < 1e-3
    with pytest.raises(InputError, match="k: sample rate 16000 Hz, the model expects 8000"):
        transforms.decode_audio(buf.getvalue(), "k", sample_rate=8000)
    with pytest.raises(InputError, match="k: cannot decode audio"):
        transforms.decode_audio(b"fLaC\x00\x00", "k")


def test_text_blocks_are_packed(tmp_path):
    make_text_data(tmp_path)
    train_tokenizer(tmp_path, tmp_path / "tok", vocab_size=40)
    write_shards("text", tmp_path, seed=0, maxcount=20, min_shards=1, tokenizer_path=tmp_path / "tok/spm.model", progress=False)
    b = next(iter(loaders.train_loader(shard_urls(tmp_path, "text", "train"), "text", 2, loaders.collate_blocks(None), 1,
                                       seed=0, text_length=16)))
    assert b.source.shape == (2, 16) and bool((b.source[:, 0] == BOS).all()) and not bool((b.source == PAD).any())


def test_tar_member_escaping_the_shard_is_refused(tmp_path):
    bad = tmp_path / "bad.tar"
    with tarfile.open(bad, "w") as tf:
        for name, data in [("../evil.png", b"x"), ("../evil.cls", b"0")]:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    with pytest.raises(InputError, match="escapes the shard"):
        list(loaders.eval_loader([str(bad)], 1, lambda s: s))
