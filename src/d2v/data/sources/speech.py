"""Speech source: a synthesised spoken-words corpus (default, offline) or LibriSpeech (needs internet).

``download_speech(cfg, root, seed)`` writes audio under ``root/raw/speech`` and the manifests
``root/raw/speech/manifest/{train,val,test}.csv`` plus ``root/raw/speech/quarantine.csv``
(see :mod:`d2v.data.manifest`).

``espeak_words``
    The first ``cfg.num_words`` words of the Speech Commands v2 vocabulary, spoken by every
    espeak-ng voice ``accent+variant`` (``cfg.accents`` x ``cfg.variants``) at every rate in
    ``cfg.rates`` and pitch in ``cfg.pitches``. espeak-ng is driven through ctypes (the pip
    package ``espeakng-loader`` ships the library and its data), about 1-2 ms per word.
    Voices in ``cfg.val_voices`` go to ``val``, voices in ``cfg.test_voices`` to ``test``, all
    others to ``train``: evaluation is on held-out voices. Leading and trailing silence is
    trimmed, the 22,050 Hz output is resampled to ``cfg.sample_rate`` and stored as 16-bit FLAC in
    ``audio/<split>/<key>.flac``. If flite is installed (``/usr/bin/flite``), its voices slt, rms
    and awb are added to ``test`` as a second-synthesiser evaluation. A re-run with the same
    config, seed and flite availability finds ``.config.json`` and returns without work.

    Determinism: espeak-ng's output depends on hidden state left by earlier utterances in the same
    process (oscillator/flutter phase, echo buffer; ``espeak_Terminate`` + ``espeak_Initialize``
    do not reset it) and breathy variants (f3, f5, ...) draw noise from a generator seeded from
    the clock. So each voice is synthesised in a fresh, minimal worker process (stdlib + ctypes
    only, ~40 ms to start) in a fixed order, and the noise generator is re-seeded before every
    utterance from (seed, key). The audio of a voice thus depends only on that voice's words,
    rates, pitches and the seed, never on other voices, on the number of CPUs, or on what the
    calling process synthesised before. Voices run in parallel (one worker per CPU).

``audio_folder``
    Your own recordings, read in place: every ``.wav``/``.flac``/``.ogg``/``.mp3`` file under
    ``cfg.folder`` (recursive, sorted; links are not followed, other files are counted). Any sample
    rate and channel count: channels are averaged to mono and the audio is resampled to
    ``cfg.sample_rate`` with :func:`resample_int16` (no trimming: durations are kept) and written as
    16-bit FLAC ``audio/<key>.flac``. An optional ``labels.csv`` at the folder root (``path,label``,
    path relative to the folder) gives each file a class label or a transcript; files it does not
    name, and every file without it, are unlabelled (pretraining only; the summary says so). Files
    that do not decode (corrupt, empty, unsupported), hold NaN/Inf, or last under 0.1 s or over the
    validation limit (30 s) are quarantined (``quarantine.csv`` paths are relative to the folder).
    Splits: seeded random over the usable files (``cfg.val_fraction``/``cfg.test_fraction``);
    voice = the file's folder. A re-run with the same config, seed and folder contents (paths,
    sizes, mtimes, ``labels.csv``) returns without work.

``librispeech``
    Downloads ``cfg.subsets`` from openslr.org, extracts them safely (no links, nothing outside
    the target folder) and builds manifests from the FLAC files and ``*.trans.txt``
    (``train-*`` -> train, ``dev-*`` -> val, ``test-*`` -> test; label = transcript,
    voice = speaker id, synth = ``human``).
"""

from __future__ import annotations

import csv
import ctypes
import hashlib
import io
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, is_dataclass
from functools import lru_cache
from math import gcd
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

import numpy as np

from d2v.data.manifest import (
    SPLITS,
    manifest_path,
    quarantine_path,
    raw_dir,
    read_manifest,
    write_manifest,
    write_quarantine,
)
from d2v.data.sources import byod
from d2v.data.validation import DEFAULT_LIMITS
from d2v.errors import ConfigError, InputError

if TYPE_CHECKING:  # d2v.config imports torch (via d2v.models); only needed for annotations
    from d2v.config import SpeechDataConfig

MODALITY = "speech"

#: The Speech Commands v2 vocabulary, in the order ``num_words`` takes from.
WORDS = (
    "yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go",
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
    "bed", "bird", "cat", "dog", "happy", "house", "marvin", "sheila", "tree", "wow",
    "backward", "forward", "follow", "learn", "visual",
)

FLITE = Path("/usr/bin/flite")  # module level so tests can point it elsewhere
FLITE_VOICES = ("slt", "rms", "awb")
FLITE_MISSING = "not installed (apt-get install flite)"

LIBRISPEECH_URL = "https://www.openslr.org/resources/12/{subset}.tar.gz"
#: sha256 of the openslr archives, as listed by torchaudio's LibriSpeech loader.
LIBRISPEECH_SHA256 = {
    "dev-clean": "76f87d090650617fca0cac8f88b9416e0ebf80350acb97b343a85fa903728ab3",
    "dev-other": "12661c48e8c3fe1de2c1caa4c3e135193bfb1811584f11f569dd12645aa84365",
    "test-clean": "39fde525e59672dc6d1551919b1478f724438a95aa55f874b576be21967e6c23",
    "test-other": "d09c181bba5cf717b3dee7d4d592af11a3ee3a09e08ae025c5506f6ebe961c29",
    "train-clean-100": "d4ddd1d5a6ab303066f14971d768ee43278a5f2a0aa43dc716b0e64ecbbbf6e2",
    "train-clean-360": "146a56496217e96c14334a160df97fffedd6e0a04e66b9c5af0d40be3c792ecf",
    "train-other-500": "ddb22f27f96ec163645d53215559df6aa36515f26e01dd70798188350adcb6d2",
}

MIN_DURATION = 0.1  # seconds; shorter utterances are quarantined
MAX_DURATION = float(DEFAULT_LIMITS["speech_max_s"])  # audio_folder: longer files would fail validation
AUDIO_EXTS = (".wav", ".flac", ".ogg", ".mp3")  # what soundfile (libsndfile >= 1.1) decodes
ESPEAK_RATE_RANGE = (80, 450)  # words per minute, as espeak-ng documents it
ESPEAK_PITCH_RANGE = (0, 100)
TRIM_DB = 40.0  # frames more than this below the loudest frame count as silence
TRIM_FRAME_S = 0.010
TRIM_PAD_S = 0.050  # silence kept either side of the speech (soft onsets and releases are below -40 dB)
STATE_FILE = ".config.json"
STATE_VERSION = 1


# --------------------------------------------------------------------------------------------
# espeak-ng through ctypes
# --------------------------------------------------------------------------------------------

_AUDIO_OUTPUT_SYNCHRONOUS = 2
_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)


def _espeak_paths() -> tuple[str, str]:
    """(library, data folder) shipped by the pip package ``espeakng-loader``."""
    try:
        import espeakng_loader
    except ImportError as e:  # pragma: no cover - it is a project dependency
        raise RuntimeError(
            "speech dataset 'espeak_words' needs the pip package espeakng-loader (pip install espeakng-loader)"
        ) from e
    return str(espeakng_loader.get_library_path()), str(espeakng_loader.get_data_path())


class Espeak:
    """espeak-ng loaded into this process, used to check voice names before a build.

    The C library keeps global state, so there is one instance per process (``Espeak.get()``).
    Synthesis itself runs in worker processes (``_WORKER``), see the module docstring.
    """

    _instance: Espeak | None = None

    @classmethod
    def get(cls) -> Espeak:
        if cls._instance is None:
            cls._instance = cls()
        return cls._instance

    def __init__(self) -> None:
        self.lib_path, data_path = _espeak_paths()
        self.data_path = Path(data_path)
        try:
            lib = ctypes.CDLL(self.lib_path)
        except OSError as e:
            raise RuntimeError(f"could not load the espeak-ng library {self.lib_path}: {e}") from e
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_Initialize.restype = ctypes.c_int
        lib.espeak_SetSynthCallback.argtypes = [_CALLBACK]
        lib.espeak_SetSynthCallback.restype = None
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetVoiceByName.restype = ctypes.c_int
        rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, str(self.data_path).encode(), 0)
        if rate <= 0:
            raise RuntimeError(
                f"espeak-ng failed to initialise (espeak_Initialize returned {rate}; data path {self.data_path})"
            )
        self.sample_rate = int(rate)
        self._callback = _CALLBACK(lambda wav, n, events: 0)  # keep a reference: the library holds the pointer
        lib.espeak_SetSynthCallback(self._callback)
        self.lib = lib
        self._variants: set[str] | None = None

    def variants(self) -> set[str]:
        """Variant names espeak-ng knows (the files in ``voices/!v``)."""
        if self._variants is None:
            vdir = self.data_path / "voices" / "!v"
            self._variants = {p.name for p in vdir.iterdir()} if vdir.is_dir() else set()
        return self._variants

    def check_voice(self, voice: str) -> None:
        """Raise ConfigError unless espeak-ng knows ``accent`` or ``accent+variant``.

        espeak-ng ignores an unknown variant silently, so variants are checked against its data
        folder; an unknown accent makes ``espeak_SetVoiceByName`` return non-zero (and keep the
        previous voice), which is turned into an error naming the voice.
        """
        accent, _, variant = voice.partition("+")
        if variant and variant not in self.variants():
            raise ConfigError(
                f"espeak-ng has no voice variant {variant!r} (in voice {voice!r}); "
                f"known variants are the files in {self.data_path / 'voices' / '!v'}"
            )
        rc = self.lib.espeak_SetVoiceByName(voice.encode())
        if rc != 0:
            raise ConfigError(
                f"espeak-ng does not know the voice {voice!r} (espeak_SetVoiceByName returned {rc}); "
                f"check the accent {accent!r} (e.g. use 'en', not 'en-gb')"
            )


# The synthesis worker: stdlib only (run with -I -S, so it starts in ~40 ms). Reads a JSON job
# {lib, data, voice, items: [[text, rate, pitch, seed], ...]} on stdin; writes the sample rate
# (int32), then per item: espeak return code (int32), byte count (uint32), int16 samples.
_WORKER = r"""
import ctypes, json, struct, sys
job = json.loads(sys.stdin.buffer.read())
lib = ctypes.CDLL(job["lib"])
CB = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)
chunks = []
def collect(wav, n, events):
    if n > 0:
        chunks.append(ctypes.string_at(wav, 2 * n))
    return 0
cb = CB(collect)
lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
lib.espeak_SetSynthCallback.argtypes = [CB]
lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
lib.espeak_Synth.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
                             ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
rate = lib.espeak_Initialize(2, 0, job["data"].encode(), 0)
if rate <= 0:
    sys.stderr.write("espeak_Initialize returned %d (data path %s)" % (rate, job["data"]))
    sys.exit(3)
lib.espeak_SetSynthCallback(cb)
rc = lib.espeak_SetVoiceByName(job["voice"].encode())
if rc != 0:
    sys.stderr.write("espeak_SetVoiceByName returned %d" % rc)
    sys.exit(4)
seed = getattr(lib, "espeak_ng_SetRandSeed", None)  # espeak-ng >= 1.52
if seed is not None:
    seed.argtypes = [ctypes.c_long]
    seed.restype = None
out = sys.stdout.buffer
out.write(struct.pack("<i", rate))
for text, wpm, pitch, s in job["items"]:
    rc = lib.espeak_SetParameter(1, wpm, 0) or lib.espeak_SetParameter(3, pitch, 0)
    if seed is not None:
        seed(s)
    del chunks[:]
    if rc == 0:
        t = text.encode("utf-8") + b"\0"
        rc = lib.espeak_Synth(t, len(t), 0, 0, 0, 0, None, None)
    data = b"".join(chunks) if rc == 0 else b""
    out.write(struct.pack("<iI", rc, len(data)))
    out.write(data)
out.flush()
"""


def espeak_synthesize(voice: str, items: list[tuple[str, int, int, int]]) -> tuple[int, list[tuple[int, np.ndarray]]]:
    """Speak ``items`` = [(text, rate, pitch, noise seed)] with ``voice`` in a fresh worker process.

    Returns (sample rate, [(espeak return code, int16 samples)] in item order). Raises
    RuntimeError naming the voice if the worker fails.
    """
    lib, data = _espeak_paths()
    job = json.dumps({"lib": lib, "data": data, "voice": voice, "items": [list(map(_json_scalar, it)) for it in items]})
    try:
        res = subprocess.run([sys.executable, "-I", "-S", "-c", _WORKER], input=job.encode(),
                             capture_output=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise RuntimeError(f"espeak-ng worker for voice {voice!r} failed to run: {e}") from e
    if res.returncode != 0:
        msg = res.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["(no message)"]
        raise RuntimeError(f"espeak-ng worker for voice {voice!r} exited with {res.returncode}: {msg[0]}")
    buf = res.stdout
    try:
        (rate,) = struct.unpack_from("<i", buf, 0)
        pos, out = 4, []
        for _ in items:
            rc, n = struct.unpack_from("<iI", buf, pos)
            pos += 8
            if pos + n > len(buf):
                raise struct.error("truncated audio")
            out.append((rc, np.frombuffer(buf, "<i2", n // 2, pos).astype(np.int16)))
            pos += n
    except struct.error as e:
        raise RuntimeError(f"espeak-ng worker for voice {voice!r} returned malformed output ({e})") from e
    return rate, out


def _json_scalar(x):
    return x if isinstance(x, str) else int(x)


# --------------------------------------------------------------------------------------------
# audio helpers
# --------------------------------------------------------------------------------------------


def trim_silence(x: np.ndarray, sr: int, db: float = TRIM_DB, frame_s: float = TRIM_FRAME_S,
                 pad_s: float = TRIM_PAD_S) -> np.ndarray:
    """Drop leading/trailing frames whose RMS is more than ``db`` below the loudest frame.

    Returns an empty array for silent input.
    """
    if x.size == 0:
        return x
    xf = x.astype(np.float64)
    frame = max(1, int(round(frame_s * sr)))
    n_frames = -(-xf.size // frame)
    padded = np.zeros(n_frames * frame)
    padded[: xf.size] = xf
    rms = np.sqrt((padded.reshape(n_frames, frame) ** 2).mean(axis=1))
    peak = rms.max()
    if peak <= 0:
        return x[:0]
    loud = np.flatnonzero(rms >= peak * 10 ** (-db / 20))
    pad = int(round(pad_s * sr))
    start = max(0, loud[0] * frame - pad)
    end = min(x.size, (loud[-1] + 1) * frame + pad)
    return x[start:end]


def resample_int16(x: np.ndarray, sr_in: int, sr_out: int) -> np.ndarray:
    """Polyphase resampling of int16 audio; int16 out (rounded, clipped)."""
    if sr_in == sr_out or x.size == 0:
        return x.astype(np.int16, copy=False)
    from scipy.signal import resample_poly

    g = gcd(sr_in, sr_out)
    up, down = sr_out // g, sr_in // g
    y = resample_poly(x.astype(np.float64), up, down, window=_resample_filter(up, down))
    return np.clip(np.round(y), -32768, 32767).astype(np.int16)


@lru_cache(maxsize=8)
def _resample_filter(up: int, down: int) -> np.ndarray:
    """The FIR filter ``resample_poly`` designs by default (Kaiser, beta 5), built once.

    Designing it (8,821 taps for 320/441) takes ~1.5 ms, twice the filtering of a word, so it is
    cached; the output is identical to ``resample_poly(x, up, down)``.
    """
    from scipy.signal import firwin

    max_rate = max(up, down)
    h = firwin(2 * 10 * max_rate + 1, 1.0 / max_rate, window=("kaiser", 5.0))
    h.setflags(write=False)
    return h


def _write_flac(path: Path, audio: np.ndarray, sr: int) -> None:
    import soundfile as sf

    # Encoding into memory and writing the bytes once is ~3x faster than letting libsndfile
    # write (and seek in) the file itself. No temp file + rename: manifests and .config.json are
    # written last, and a rebuild clears the audio folder, so a half-written file is never used.
    buf = io.BytesIO()
    sf.write(buf, audio, sr, format="FLAC", subtype="PCM_16")
    path.write_bytes(buf.getvalue())


_UNSAFE = re.compile(r"[^a-z0-9._-]+")


def safe_key(*parts: object) -> str:
    """Join parts with '-', lower-cased, anything outside [a-z0-9._-] turned into '_'."""
    return "-".join(_UNSAFE.sub("_", str(p).lower()).strip("_") or "_" for p in parts)


# --------------------------------------------------------------------------------------------
# espeak_words corpus
# --------------------------------------------------------------------------------------------


def _check_config(cfg: SpeechDataConfig) -> tuple[list[str], list[str]]:
    """Validate the espeak_words settings; return (words, voices in grid order)."""
    if not 1 <= int(cfg.num_words) <= len(WORDS):
        raise ConfigError(f"speech num_words={cfg.num_words}: must be between 1 and {len(WORDS)}")
    if int(cfg.sample_rate) <= 0:
        raise ConfigError(f"speech sample_rate={cfg.sample_rate}: must be a positive number of Hz")
    for name in ("accents", "variants", "rates", "pitches"):
        values = list(getattr(cfg, name))
        if not values:
            raise ConfigError(f"speech {name} is empty: give at least one value")
        dup = sorted({str(v) for v in values if values.count(v) > 1})
        if dup:
            raise ConfigError(f"speech {name} lists {dup} more than once")
    for r in cfg.rates:
        if not ESPEAK_RATE_RANGE[0] <= int(r) <= ESPEAK_RATE_RANGE[1]:
            lo, hi = ESPEAK_RATE_RANGE
            raise ConfigError(f"speech rate {r}: espeak-ng takes {lo}..{hi} words per minute")
    for p in cfg.pitches:
        if not ESPEAK_PITCH_RANGE[0] <= int(p) <= ESPEAK_PITCH_RANGE[1]:
            raise ConfigError(f"speech pitch {p}: espeak-ng takes {ESPEAK_PITCH_RANGE[0]}..{ESPEAK_PITCH_RANGE[1]}")
    voices = [f"{a}+{v}" for a in cfg.accents for v in cfg.variants]
    for name in ("val_voices", "test_voices"):
        for v in getattr(cfg, name):
            if v not in voices:
                raise ConfigError(
                    f"speech {name}: voice {v!r} is not in the grid accents x variants "
                    f"({', '.join(voices[:6])}{', ...' if len(voices) > 6 else ''})"
                )
    both = sorted(set(cfg.val_voices) & set(cfg.test_voices))
    if both:
        raise ConfigError(f"speech voices {both} are in both val_voices and test_voices")
    if len(set(cfg.val_voices) | set(cfg.test_voices)) >= len(voices):
        raise ConfigError("speech val_voices + test_voices hold out every voice: nothing is left for train")
    return list(WORDS[: int(cfg.num_words)]), voices


def _split_of(voice: str, cfg: SpeechDataConfig) -> str:
    if voice in cfg.val_voices:
        return "val"
    if voice in cfg.test_voices:
        return "test"
    return "train"


def _finish(audio: np.ndarray, sr_in: int, sr_out: int) -> tuple[np.ndarray | None, str]:
    """Trim + resample; (None, reason) when the result is unusable."""
    if audio.size == 0:
        return None, "synthesis returned no audio"
    audio = trim_silence(audio, sr_in)
    if audio.size == 0:
        return None, "synthesis returned only silence"
    out = resample_int16(audio, sr_in, sr_out)
    if out.size < MIN_DURATION * sr_out:
        return None, f"too short after trimming ({out.size / sr_out:.3f} s < {MIN_DURATION} s)"
    return out, ""


def utterance_seed(seed: int, key: str) -> int:
    """The seed of espeak-ng's noise generator for one utterance: a function of (seed, key)."""
    digest = hashlib.sha256(f"{int(seed)}:{key}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def _save(raw: np.ndarray, sr_in: int, sr_out: int, path: Path) -> tuple[int, str]:
    """Trim, resample and write one utterance; (samples written, "") or (0, quarantine reason)."""
    audio, reason = _finish(raw, sr_in, sr_out)
    if audio is None:
        return 0, reason
    _write_flac(path, audio, sr_out)
    return int(audio.size), ""


def _espeak_voice(voice: str, items: list[tuple], seed: int, sr_out: int, speech_dir: Path,
                  bar) -> tuple[list[dict], list[dict]]:
    """Synthesise one voice's ``items`` = [(key, split, word, voice, rate, pitch)] and write them."""
    sr_in, raws = espeak_synthesize(voice, [(w, r, p, utterance_seed(seed, k)) for k, _, w, _, r, p in items])
    rows, bad = [], []
    for (key, split, word, _, rate, pitch), (rc, raw) in zip(items, raws):
        rel = f"audio/{split}/{key}.flac"
        n, reason = (0, f"espeak_Synth returned {rc}") if rc != 0 else _save(raw, sr_in, sr_out, speech_dir / rel)
        if reason:
            bad.append({"key": key, "path": rel,
                        "reason": f"espeak-ng {voice} rate {rate} pitch {pitch} {word!r}: {reason}"})
        else:
            rows.append({"key": key, "split": split, "label": word, "path": rel,
                         "duration": f"{n / sr_out:.6f}", "sample_rate": sr_out, "voice": voice,
                         "synth": "espeak-ng"})
    bar.update(len(items))
    return rows, bad


def _n_workers() -> int:
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        n = os.cpu_count() or 1
    return max(2, min(n, 8))


def _flite_one(job: tuple) -> tuple[dict | None, dict | None]:
    word, fvoice, sr_out, speech_dir, tmpdir = job
    import soundfile as sf

    key = safe_key("flite", word, fvoice)
    rel = f"audio/test/{key}.flac"
    wav = Path(tmpdir) / f"{key}.wav"
    cmd = [str(FLITE), "-voice", fvoice, "-t", word, "-o", str(wav)]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, {"key": key, "path": rel, "reason": f"flite {fvoice} {word!r}: {e}"}
    if res.returncode != 0 or not wav.is_file():
        msg = (res.stderr or res.stdout or "").strip().splitlines()[-1:] or ["no output file"]
        return None, {"key": key, "path": rel,
                      "reason": f"flite {fvoice} {word!r}: exit {res.returncode}: {msg[0]}"}
    try:
        data, sr_in = sf.read(str(wav), dtype="int16", always_2d=True)
    except Exception as e:  # noqa: BLE001 - any decode failure is a quarantine reason
        return None, {"key": key, "path": rel, "reason": f"flite {fvoice} {word!r}: unreadable wav: {e}"}
    mono = data.mean(axis=1).round().astype(np.int16) if data.shape[1] > 1 else data[:, 0]
    audio, reason = _finish(mono, int(sr_in), sr_out)
    if audio is None:
        return None, {"key": key, "path": rel, "reason": f"flite {fvoice} {word!r}: {reason}"}
    _write_flac(Path(speech_dir) / rel, audio, sr_out)
    dur = audio.size / sr_out
    row = {"key": key, "split": "test", "label": word, "path": rel, "duration": f"{dur:.6f}",
           "sample_rate": sr_out, "voice": f"flite-{fvoice}", "synth": "flite"}
    return row, None


_LIBRISPEECH_FIELDS = ("dataset", "subsets", "sample_rate", "folder")
_AUDIO_FOLDER_FIELDS = ("dataset", "folder", "sample_rate", "val_fraction", "test_fraction")
_NOT_ESPEAK = ("subsets", "folder", "val_fraction", "test_fraction")  # fields espeak_words does not read


def _state(cfg: SpeechDataConfig, seed: int, **extra) -> dict:
    """What the output depends on, as stored in ``.config.json`` (normalised through JSON).

    Only the fields the chosen dataset reads are kept, so that e.g. editing ``subsets`` does not
    rebuild the espeak corpus.
    """
    conf = asdict(cfg) if is_dataclass(cfg) else dict(cfg)
    if conf.get("dataset") == "librispeech":
        conf = {k: conf[k] for k in _LIBRISPEECH_FIELDS if k in conf}
    elif conf.get("dataset") == "audio_folder":
        conf = {k: conf[k] for k in _AUDIO_FOLDER_FIELDS if k in conf}
    else:
        for k in _NOT_ESPEAK:
            conf.pop(k, None)
    return json.loads(json.dumps({"version": STATE_VERSION, "config": conf, "seed": int(seed), **extra}))


def _espeak_version() -> str:
    """espeakng-loader's version (it pins the espeak-ng library and voice data)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("espeakng-loader")
    except PackageNotFoundError:  # pragma: no cover - then synthesis fails with a clear error anyway
        return "unknown"


def _read_state(speech_dir: Path) -> dict | None:
    try:
        return json.loads((speech_dir / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _existing_summary(root: Path) -> dict | None:
    """The summary of a finished earlier build, or None if a manifest or an audio file is missing."""
    speech_dir = raw_dir(root, MODALITY)
    counts, seconds = {}, 0.0
    try:
        for split in SPLITS:
            with open(manifest_path(root, MODALITY, split), newline="", encoding="utf-8") as f:
                rows = list(csv.DictReader(f))
            if not all((speech_dir / r["path"]).is_file() for r in rows):
                return None
            counts[split] = len(rows)
            seconds += sum(float(r["duration"]) for r in rows)
        with open(quarantine_path(root, MODALITY), newline="", encoding="utf-8") as f:
            quarantined = sum(1 for _ in csv.DictReader(f))
    except (OSError, KeyError, ValueError):
        return None
    return {"counts": counts, "quarantined": quarantined, "seconds": round(seconds, 3)}


def _build_espeak_words(cfg: SpeechDataConfig, root: Path, seed: int, progress: bool) -> dict:
    from tqdm import tqdm

    t0 = time.perf_counter()
    words, voices = _check_config(cfg)
    speech_dir = raw_dir(root, MODALITY)
    have_flite = FLITE.is_file() and os.access(FLITE, os.X_OK)
    state = _state(cfg, seed, flite=have_flite, espeak=_espeak_version(), trim=[TRIM_DB, TRIM_FRAME_S, TRIM_PAD_S],
                   min_duration=MIN_DURATION)
    flite_note = f"{len(FLITE_VOICES)} voices ({', '.join(FLITE_VOICES)}) in test" if have_flite else FLITE_MISSING

    if _read_state(speech_dir) == state and (out := _existing_summary(root)) is not None:
        out.update(dataset=cfg.dataset, skipped=True, flite=flite_note,
                   elapsed=round(time.perf_counter() - t0, 3))
        return out

    sr_out = int(cfg.sample_rate)
    items = [
        (safe_key("espeak", word, a, v, f"r{rate}", f"p{pitch}"), _split_of(f"{a}+{v}", cfg), word, f"{a}+{v}",
         int(rate), int(pitch))
        for a in cfg.accents for v in cfg.variants for rate in cfg.rates for pitch in cfg.pitches for word in words
    ]
    dup = [k for k, n in Counter(it[0] for it in items).items() if n > 1]
    if dup:
        raise ConfigError(f"speech: accents x variants give the same file name twice ({dup[0]!r}); "
                         "names are lower-cased, so list each accent and variant once")

    # Validate every voice before writing anything (errors name the voice).
    eng = Espeak.get()
    for v in voices:
        eng.check_voice(v)

    # A fresh build: drop the state file first so an interrupted run is never taken as complete,
    # and clear audio from an older config so no stale files linger next to the manifests.
    speech_dir.mkdir(parents=True, exist_ok=True)
    (speech_dir / STATE_FILE).unlink(missing_ok=True)
    shutil.rmtree(speech_dir / "audio", ignore_errors=True)
    for split in SPLITS:
        (speech_dir / "audio" / split).mkdir(parents=True, exist_ok=True)

    n_flite = len(words) * len(FLITE_VOICES) if have_flite else 0

    rows: dict[str, list[dict]] = {s: [] for s in SPLITS}
    bad: list[dict] = []
    with tqdm(total=len(items) + n_flite, desc="speech: espeak-ng words", unit="utt",
              disable=not progress) as bar:
        # One worker process per voice, a few at a time; results are taken in voice order.
        by_voice: dict[str, list[tuple]] = {}
        for it in items:
            by_voice.setdefault(it[3], []).append(it)
        with ThreadPoolExecutor(_n_workers(), thread_name_prefix="d2v-espeak") as pool:
            futures = [pool.submit(_espeak_voice, v, its, seed, sr_out, speech_dir, bar) for v, its in by_voice.items()]
            try:
                for fut in futures:
                    vrows, vbad = fut.result()
                    for row in vrows:
                        rows[row["split"]].append(row)
                    bad.extend(vbad)
            except BaseException:
                for f in futures:
                    f.cancel()
                raise

        if have_flite:
            bar.set_description("speech: flite words")
            with tempfile.TemporaryDirectory(prefix="d2v-flite-") as tmp:
                fjobs = [(w, fv, sr_out, str(speech_dir), tmp) for fv in FLITE_VOICES for w in words]
                with ThreadPoolExecutor(2) as pool:
                    for row, b in pool.map(_flite_one, fjobs):
                        if row is not None:
                            rows["test"].append(row)
                        if b is not None:
                            bad.append(b)
                        bar.update(1)

    seconds = sum(float(r["duration"]) for s in SPLITS for r in rows[s])
    counts = {s: write_manifest(manifest_path(root, MODALITY, s), MODALITY, rows[s]) for s in SPLITS}
    n_bad = write_quarantine(quarantine_path(root, MODALITY), bad)
    (speech_dir / STATE_FILE).write_text(json.dumps(state, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    return {
        "dataset": cfg.dataset, "skipped": False, "counts": counts, "quarantined": n_bad,
        "seconds": round(seconds, 3), "elapsed": round(time.perf_counter() - t0, 3), "flite": flite_note,
    }


# --------------------------------------------------------------------------------------------
# LibriSpeech
# --------------------------------------------------------------------------------------------


def librispeech_split(subset: str) -> str:
    for prefix, split in (("train-", "train"), ("dev-", "val"), ("test-", "test")):
        if subset.startswith(prefix):
            return split
    raise ConfigError(f"LibriSpeech subset {subset!r}: name must start with train-, dev- or test-")


def safe_extract(archive: Path, dest: Path) -> int:
    """Extract a tar archive into ``dest``, refusing links, special files and paths outside ``dest``.

    Members are checked one by one as the archive streams (one pass over a .tar.gz); a bad member
    raises ValueError naming it before it is written. Returns the number of members extracted.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    base = dest.resolve()
    n = 0
    try:
        with tarfile.open(archive, mode="r|*") as tar:
            for m in tar:
                if m.issym() or m.islnk():
                    raise InputError(f"{archive}: refusing tar member {m.name!r}: it is a link (to {m.linkname!r})")
                if not (m.isfile() or m.isdir()):
                    raise InputError(f"{archive}: refusing tar member {m.name!r}: not a regular file or folder")
                target = (base / m.name).resolve()
                if os.path.isabs(m.name) or not (target == base or base in target.parents):
                    raise InputError(f"{archive}: refusing tar member {m.name!r}: its path leaves {dest}")
                try:
                    if hasattr(tarfile, "data_filter"):
                        tar.extract(m, base, filter="data")
                    else:  # pragma: no cover - Python without extraction filters
                        tar.extract(m, base)
                except tarfile.FilterError as e:
                    raise InputError(f"{archive}: refusing tar member {m.name!r}: {e}") from e
                n += 1
    except (tarfile.ReadError, tarfile.CompressionError, EOFError) as e:
        raise InputError(f"{archive}: not a readable (or a truncated) tar archive: {e}") from e
    return n


def build_librispeech_manifests(speech_dir: Path, subsets: Iterable[str], sample_rate: int = 16000,
                                root: Path | None = None) -> dict:
    """Manifests from extracted LibriSpeech folders ``speech_dir/LibriSpeech/<subset>/<spk>/<chapter>/``.

    Every ``*.trans.txt`` line ``<spk>-<chapter>-<utt> TRANSCRIPT`` becomes a row (label =
    transcript, voice = speaker id, synth = human); paths are relative to ``speech_dir``.
    Utterances with a missing or unreadable FLAC, a sample rate other than ``sample_rate``, a
    duration under 0.1 s, or a FLAC without a transcript line are quarantined. ``root`` is the data
    root (manifests go to ``manifest_path(root, "speech", split)``); by default it is taken as
    ``speech_dir/../..``.
    """
    import soundfile as sf

    speech_dir = Path(speech_dir)
    root = Path(root) if root is not None else speech_dir.parent.parent
    rows: dict[str, list[dict]] = {s: [] for s in SPLITS}
    bad: list[dict] = []
    seconds = 0.0
    for subset in subsets:
        split = librispeech_split(subset)
        sdir = speech_dir / "LibriSpeech" / subset
        if not sdir.is_dir():
            raise FileNotFoundError(f"LibriSpeech subset folder not found: {sdir}")
        seen: set[Path] = set()
        for trans in sorted(sdir.rglob("*.trans.txt")):
            try:
                lines = trans.read_text(encoding="utf-8").splitlines()
            except UnicodeDecodeError as e:  # its FLAC files are then quarantined as "no transcript line"
                bad.append({"key": safe_key("librispeech", trans.name), "path": trans.relative_to(speech_dir).as_posix(),
                            "reason": f"transcript not UTF-8 ({e.reason} at byte {e.start})"})
                continue
            for lineno, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                utt, _, text = line.strip().partition(" ")
                flac = trans.parent / f"{utt}.flac"
                rel = flac.relative_to(speech_dir).as_posix()
                key = safe_key("librispeech", utt)
                seen.add(flac)
                if not text.strip():
                    bad.append({"key": key, "path": rel, "reason": f"{trans.name}:{lineno}: empty transcript"})
                    continue
                if flac.is_symlink():  # not followed: it may point outside the dataset folder
                    bad.append({"key": key, "path": rel, "reason": f"symbolic link (to {os.readlink(flac)!r}): "
                                "links in the dataset folder are not followed"})
                    continue
                if not flac.is_file():
                    bad.append({"key": key, "path": rel, "reason": f"{trans.name}:{lineno}: audio file missing"})
                    continue
                try:
                    info = sf.info(str(flac))
                except Exception as e:  # noqa: BLE001 - any decode failure is a quarantine reason
                    bad.append({"key": key, "path": rel, "reason": f"unreadable audio: {e}"})
                    continue
                if info.samplerate != sample_rate:
                    bad.append({"key": key, "path": rel,
                                "reason": f"sample rate {info.samplerate} Hz, expected {sample_rate} Hz"})
                    continue
                dur = info.frames / info.samplerate
                if dur < MIN_DURATION:
                    bad.append({"key": key, "path": rel, "reason": f"too short ({dur:.3f} s)"})
                    continue
                seconds += dur
                rows[split].append({
                    "key": key, "split": split, "label": text.strip(), "path": rel,
                    "duration": f"{dur:.6f}", "sample_rate": info.samplerate,
                    "voice": utt.split("-")[0], "synth": "human",
                })
        for flac in sorted(sdir.rglob("*.flac")):
            if flac not in seen:
                bad.append({"key": safe_key("librispeech", flac.stem), "path": flac.relative_to(speech_dir).as_posix(),
                            "reason": "no transcript line for this file"})
    counts = {s: write_manifest(manifest_path(root, MODALITY, s), MODALITY, rows[s]) for s in SPLITS}
    n_bad = write_quarantine(quarantine_path(root, MODALITY), bad)
    return {"counts": counts, "quarantined": n_bad, "seconds": round(seconds, 3)}


def _link_librispeech(folder: Path, speech_dir: Path, subsets: list[str]) -> None:
    """``speech_dir/LibriSpeech`` -> your extracted ``LibriSpeech`` folder (the one holding
    ``<subset>/<speaker>/<chapter>/``), so manifest paths stay ``LibriSpeech/<subset>/...``."""
    folder = folder.expanduser().resolve()
    if not folder.is_dir():
        raise FileNotFoundError(f"LibriSpeech folder not found: {folder} (data.speech.folder)")
    missing = [s for s in subsets if not (folder / s).is_dir()]
    if missing:
        have = sorted(p.name for p in folder.iterdir() if p.is_dir())[:8]
        raise FileNotFoundError(f"LibriSpeech folder {folder} has no {', '.join(missing)} subfolder "
                                f"(data.speech.subsets; it holds {have or 'no folders'}): point data.speech.folder "
                                "at the extracted LibriSpeech/ folder itself")
    link = speech_dir / "LibriSpeech"
    if link.is_symlink():
        link.unlink()
    elif link.exists():
        raise FileExistsError(f"{link} exists (a downloaded copy) and is not a link; remove it to use "
                              f"data.speech.folder={folder}")
    link.symlink_to(folder, target_is_directory=True)


def _build_librispeech(cfg: SpeechDataConfig, root: Path, seed: int, progress: bool) -> dict:
    from d2v.data.download import download_file  # lazy: optional until the librispeech path is used

    t0 = time.perf_counter()
    subsets = list(cfg.subsets)
    if not subsets:
        raise ConfigError("speech subsets is empty: name at least one LibriSpeech subset (e.g. dev-clean)")
    for s in subsets:
        librispeech_split(s)
    speech_dir = raw_dir(root, MODALITY)
    state = _state(cfg, seed)
    if _read_state(speech_dir) == state and (out := _existing_summary(root)) is not None:
        out.update(dataset=cfg.dataset, skipped=True, flite="not used (librispeech)",
                   elapsed=round(time.perf_counter() - t0, 3))
        return out
    speech_dir.mkdir(parents=True, exist_ok=True)
    (speech_dir / STATE_FILE).unlink(missing_ok=True)
    if cfg.folder:  # a LibriSpeech copy you already have: linked and read in place, nothing downloaded
        _link_librispeech(Path(cfg.folder), speech_dir, subsets)
    for subset in subsets if not cfg.folder else ():
        done = speech_dir / "LibriSpeech" / subset / ".extracted"
        if done.is_file():
            continue
        archive = speech_dir / "downloads" / f"{subset}.tar.gz"
        archive.parent.mkdir(parents=True, exist_ok=True)
        download_file(LIBRISPEECH_URL.format(subset=subset), archive, sha256=LIBRISPEECH_SHA256.get(subset),
                      progress=progress)
        safe_extract(archive, speech_dir)
        if not done.parent.is_dir():
            raise RuntimeError(f"{archive}: extracted, but {done.parent} does not exist (not a LibriSpeech archive?)")
        done.write_text("ok\n")
    out = build_librispeech_manifests(speech_dir, subsets, int(cfg.sample_rate), root=root)
    (speech_dir / STATE_FILE).write_text(json.dumps(state, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    out.update(dataset=cfg.dataset, skipped=False, flite="not used (librispeech)",
               elapsed=round(time.perf_counter() - t0, 3))
    return out


# --------------------------------------------------------------------------------------------
# audio_folder: your own recordings
# --------------------------------------------------------------------------------------------


def convert_audio(src: Path, sr_out: int, dest: Path) -> tuple[int, int, int, str]:
    """Decode ``src`` (any rate, any channels), mix to mono, resample to ``sr_out``, write 16-bit FLAC ``dest``.

    Returns (samples written, input sample rate, input channels, "") or (0, rate, channels, quarantine
    reason) for a file that does not decode, is empty, holds NaN/Inf or is too short or too long.
    """
    import soundfile as sf

    try:
        if src.stat().st_size == 0:
            return 0, 0, 0, "empty file (0 bytes)"
        info = sf.info(str(src))
        sr_in, channels = int(info.samplerate), int(info.channels)
        if info.frames > (MAX_DURATION + 1.0) * sr_in:  # refused before decoding it all into memory
            return 0, sr_in, channels, f"longer than {MAX_DURATION:g} s ({info.frames / sr_in:.1f} s): cut it into shorter clips"
        data, _ = sf.read(str(src), dtype="float64", always_2d=True)
    except Exception as e:  # noqa: BLE001 - any decode failure is a quarantine reason
        return 0, 0, 0, f"unreadable audio: {str(e).strip() or type(e).__name__}"
    if data.shape[0] == 0:
        return 0, sr_in, channels, "no audio frames (empty file)"
    if not np.isfinite(data).all():
        return 0, sr_in, channels, f"{int((~np.isfinite(data)).sum())} NaN/Inf samples"
    # Mix in float, then the int16 scale soundfile itself uses (x * 32768), so 16-bit input is exact.
    mono = np.clip(np.round(data.mean(axis=1) * 32768.0), -32768, 32767).astype(np.int16)
    audio = resample_int16(mono, sr_in, sr_out)
    dur = audio.size / sr_out
    if dur < MIN_DURATION:
        return 0, sr_in, channels, f"too short ({dur:.3f} s < {MIN_DURATION} s)"
    if dur > MAX_DURATION:
        return 0, sr_in, channels, f"longer than {MAX_DURATION:g} s ({dur:.1f} s): cut it into shorter clips"
    dest.parent.mkdir(parents=True, exist_ok=True)
    _write_flac(dest, audio, sr_out)
    return int(audio.size), sr_in, channels, ""


def _manifest_labels(root: Path) -> list[str]:
    labels: list[str] = []
    for split in SPLITS:
        with open(manifest_path(root, MODALITY, split), newline="", encoding="utf-8") as f:
            labels += [r["label"] for r in csv.DictReader(f)]
    return labels


def _folder_notes(labels: list[str], has_csv: bool, folder: Path, scan: byod.FolderScan) -> list[str]:
    """What the report should tell about labels (none: pretraining only) and ignored files."""
    notes = []
    n = sum(1 for x in labels if x)
    if not n:
        why = "no labels.csv" if not has_csv else "labels.csv gives no non-empty label"
        notes.append(f"unlabelled ({why}): usable for pretraining, not for the speech task")
    elif n < len(labels):
        notes.append(f"{len(labels) - n} of {len(labels)} clips are not labelled in labels.csv: pretraining only")
    if scan.ignored:
        notes.append(f"{len(scan.ignored)} file(s) that are not {'/'.join(AUDIO_EXTS)} were ignored, e.g. "
                     f"{scan.ignored[0].relative_to(folder).as_posix()}")
    return notes


def _build_audio_folder(cfg: SpeechDataConfig, root: Path, seed: int, progress: bool) -> dict:
    from tqdm import tqdm

    t0 = time.perf_counter()
    sr_out = int(cfg.sample_rate)
    if sr_out <= 0:
        raise ConfigError(f"speech sample_rate={cfg.sample_rate}: must be a positive number of Hz")
    for name in ("val_fraction", "test_fraction"):
        if not 0.0 <= float(getattr(cfg, name)) < 1.0:
            raise ConfigError(f"data.speech.{name}={getattr(cfg, name)} must be in [0, 1)")
    if cfg.val_fraction + cfg.test_fraction >= 1.0:
        raise ConfigError("data.speech.val_fraction + data.speech.test_fraction must be < 1")
    speech_dir = raw_dir(root, MODALITY)
    folder = byod.resolve_folder(cfg.folder, "data.speech.folder", "audio", speech_dir)
    scan = byod.scan_folder(folder, AUDIO_EXTS)
    labels = byod.read_labels_csv(folder, AUDIO_EXTS)
    if not scan.files:
        raise InputError(f"audio folder {folder}: no {'/'.join(AUDIO_EXTS)} files found (searched recursively; "
                         f"{len(scan.ignored)} other files, {len(scan.links)} links)")
    source = f"audio folder {folder} (read in place; resampled copies in {speech_dir / 'audio'})"
    extra = {"flite": "not used (audio_folder)", "source": source, "files": len(scan.files),
             "ignored_files": len(scan.ignored), "labels_csv": labels is not None}
    state = _state(cfg, seed, folder=str(folder), files=byod.fingerprint(folder, scan),
                   durations=[MIN_DURATION, MAX_DURATION])
    if _read_state(speech_dir) == state and (out := _existing_summary(root)) is not None:
        have = _manifest_labels(root)
        out.update(dataset=cfg.dataset, skipped=True, labelled=any(have),
                   notes=_folder_notes(have, labels is not None, folder, scan),
                   elapsed=round(time.perf_counter() - t0, 3), **extra)
        return out

    # A fresh build (as espeak_words): no state file until the manifests are complete, no stale audio.
    speech_dir.mkdir(parents=True, exist_ok=True)
    (speech_dir / STATE_FILE).unlink(missing_ok=True)
    shutil.rmtree(speech_dir / "audio", ignore_errors=True)

    rels = [p.relative_to(folder).as_posix() for p in scan.files]
    keys = byod.unique_keys("af", rels)
    jobs = [(p, sr_out, speech_dir / "audio" / f"{k}.flac") for p, k in zip(scan.files, keys)]
    good: list[dict] = []
    bad: list[dict] = [
        {"key": byod.unique_keys("af", [rel])[0], "path": rel,
         "reason": f"symbolic link (to {os.readlink(link)!r}): links in the audio folder are not followed"}
        for link in scan.links for rel in [link.relative_to(folder).as_posix()]
    ]
    rates, channels = Counter(), Counter()
    with ThreadPoolExecutor(_n_workers(), thread_name_prefix="d2v-audio") as pool:
        results = pool.map(lambda job: convert_audio(*job), jobs)
        for rel, key, (n, sr_in, ch, reason) in tqdm(zip(rels, keys, results), total=len(jobs), unit="file",
                                                   desc="speech: audio folder", disable=not progress):
            if reason:
                bad.append({"key": key, "path": rel, "reason": reason})
                continue
            rates[sr_in] += 1
            channels[ch] += 1
            parent = PurePosixPath(rel).parent.as_posix()
            good.append({"key": key, "split": "", "label": (labels or {}).get(rel, ""), "path": f"audio/{key}.flac",
                         "duration": f"{n / sr_out:.6f}", "sample_rate": sr_out, "voice": parent,
                         "synth": "audio_folder"})
    # Splits over the usable files only, so that val and test are never left empty by a bad file.
    names = byod.split_names(len(good), float(cfg.val_fraction), float(cfg.test_fraction),
                             byod.source_rng(seed, "audio_folder"))
    rows: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for row, split in zip(good, names):
        rows[split].append({**row, "split": split})
    counts = {s: write_manifest(manifest_path(root, MODALITY, s), MODALITY, rows[s]) for s in SPLITS}
    n_bad = write_quarantine(quarantine_path(root, MODALITY), bad)
    (speech_dir / STATE_FILE).write_text(json.dumps(state, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    notes = _folder_notes([r["label"] for r in good], labels is not None, folder, scan)
    return {
        "dataset": cfg.dataset, "skipped": False, "counts": counts, "quarantined": n_bad,
        "quarantine_reasons": dict(Counter(r["reason"].split(" (")[0].split(":")[0] for r in bad)),
        "quarantine_examples": byod.examples(bad),
        "seconds": round(sum(float(r["duration"]) for r in good), 3), "elapsed": round(time.perf_counter() - t0, 3),
        "labelled": any(r["label"] for r in good), "notes": notes,
        "input_sample_rates": {str(k): v for k, v in sorted(rates.items())},
        "input_channels": {str(k): v for k, v in sorted(channels.items())}, **extra,
    }


# --------------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------------


def download_speech(cfg: SpeechDataConfig, root: Path, seed: int, progress: bool = True) -> dict:
    """Build the speech corpus and its manifests under ``root/raw/speech``; return a summary.

    Summary keys: ``dataset``, ``counts`` ({split: rows}), ``quarantined``, ``seconds`` (audio in
    the manifests), ``elapsed`` (wall seconds), ``flite`` (what flite contributed, or why not),
    ``skipped`` (True when the output already matched this config and seed); ``audio_folder`` adds
    ``labelled``, ``notes``, ``source``, ``quarantine_reasons``/``quarantine_examples`` and the input
    sample rates and channel counts.
    """
    root = Path(root)
    if cfg.dataset == "espeak_words":
        return _build_espeak_words(cfg, root, seed, progress)
    if cfg.dataset == "librispeech":
        out = _build_librispeech(cfg, root, seed, progress)
    elif cfg.dataset == "audio_folder":
        out = _build_audio_folder(cfg, root, seed, progress)
    else:
        raise ConfigError(f"speech dataset {cfg.dataset!r}: expected espeak_words, librispeech or audio_folder")
    out["ctc_alphabet"] = ctc_alphabet_report(root)
    if out["ctc_alphabet"]["labels_with_other_characters"]:
        a = out["ctc_alphabet"]
        note = (f"{a['labels_with_other_characters']} of {a['labels']} labels hold characters outside the CTC "
                f"letters (A-Z, apostrophe, space): {a['characters']!r} (e.g. {a['example']}); as transcripts "
                "(finetune.speech.head=ctc) those characters are not learned or scored")
        out["notes"] = [*out.get("notes", []), note]
        print(f"download speech: warning: {note}", file=sys.stderr)
    return out


def ctc_alphabet_report(root: Path, examples: int = 1) -> dict:
    """Counts of the manifests' labels with characters the letter CTC vocabulary lacks (upper-cased;
    white space separates words): a transcript such as "Hello, 42!" would be learned as "HELLO"."""
    from d2v.models.ctc import LETTERS

    known = set(LETTERS[2:])  # the apostrophe and A-Z (blank and "|" are not characters of a text)
    n, bad, chars, example = 0, 0, set(), ""
    for split in SPLITS:
        p = manifest_path(root, MODALITY, split)
        if not p.is_file():
            continue
        for key, label in read_manifest(p)[["key", "label"]].itertuples(index=False):
            if not label:
                continue
            n += 1
            other = {c for c in str(label).upper() if c not in known and not c.isspace()}
            if other:
                bad, chars = bad + 1, chars | other
                example = example or f"{key}: {label!r}"
    return {"labels": n, "labels_with_other_characters": bad, "characters": "".join(sorted(chars)),
            "example": example}

