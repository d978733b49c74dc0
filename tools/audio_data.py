"""Generated audio for tools/streaming_models.py: speech-like and non-speech streams with
per-sample speech labels (the VAD), and one-second keyword clips as log-mel features (the
KWS). Nothing is downloaded; every draw is seeded.

Speech-like sound: utterances of 1-7 syllables. A syllable is an optional fricative onset
(band-passed noise, 30-120 ms) and a voiced nucleus (60-300 ms): a harmonic series on a
gliding, vibrating pitch (f0 in the generator's range), its harmonics weighted by three
formant resonances that glide between two vowels, under an attack/decay envelope; gaps of
up to 120 ms between syllables count as speech (an annotator marks the utterance).
Non-speech: coloured noise bursts (spectrum 1/f^alpha), mains hum (50/60 Hz and its
harmonics), click trains, steady beeps, silence; under everything a background noise of
the stream's colour at an SNR below the speech level.

GEN["train"] and GEN["calib"] draw pitch 80-300 Hz and noise from white to pink; GEN["eval"]
draws pitch 90-340 Hz, noise colours from blue to brown (alpha -0.5..2) and lower SNRs,
so the held-out streams differ from training in settings as well as seeds.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

CACHE = Path.home() / ".cache" / "onnxqlimit" / "streaming"
SEEDS = {"train": 0, "calib": 1000, "eval": 2000}
GEN = {
    "train": dict(f0=(80.0, 300.0), alphas=(0.0, 1.0), snr=(3.0, 30.0), formant_jitter=0.10),
    "calib": dict(f0=(80.0, 300.0), alphas=(0.0, 1.0), snr=(3.0, 30.0), formant_jitter=0.10),
    "eval": dict(f0=(90.0, 340.0), alphas=(-0.5, 2.0), snr=(0.0, 25.0), formant_jitter=0.12),
}
VOWELS = {"a": (750, 1250, 2600), "i": (300, 2300, 3000), "u": (330, 850, 2400), "e": (500, 1900, 2600),
          "o": (500, 900, 2500), "ae": (660, 1700, 2500), "er": (480, 1350, 1700)}


def db(level: float) -> float:
    return float(10 ** (level / 20))


def colored_noise(rng, n: int, alpha: float, band: tuple[float, float] | None = None, sr: int = 16000):
    """Unit-RMS noise with power spectrum ~ 1/f^alpha (0 white, 1 pink, 2 brown, -1 blue);
    `band` (Hz): zero outside it."""
    spec = np.fft.rfft(rng.standard_normal(max(n, 2)))
    f = np.fft.rfftfreq(max(n, 2), 1 / sr)
    f[0] = f[1]
    spec *= f ** (-alpha / 2)
    if band is not None:
        spec[(f < band[0]) | (f > min(band[1], 0.48 * sr))] = 0
    x = np.fft.irfft(spec, max(n, 2))[:n]
    return x / (np.sqrt(np.mean(x ** 2)) + 1e-12)


def _envelope(n: int, attack: float, release: float) -> np.ndarray:
    t = np.arange(n)
    a, r = max(1, int(attack * n)), max(1, int(release * n))
    return np.minimum(np.minimum(1.0, (t + 1) / a), np.minimum(1.0, (n - t) / r))


def voiced(rng, n: int, sr: int, f0: float, formants_a, formants_b, jitter: float = 0.0,
           f0_slope: float = 0.0) -> np.ndarray:
    """A harmonic series on a gliding pitch (f0 x 2^(f0_slope octaves) over the segment, plus
    vibrato), weighted by formant resonances gliding from formants_a to formants_b."""
    t = np.arange(n) / sr
    u = t / max(t[-1], 1e-9) if n > 1 else t
    vib = 0.03 * np.sin(2 * np.pi * rng.uniform(3, 7) * t + rng.uniform(0, 6.3))
    pitch = f0 * 2 ** (f0_slope * u + vib)
    phase = 2 * np.pi * np.cumsum(pitch) / sr
    k_max = int(min(40, 0.45 * sr / pitch.max()))
    k = np.arange(1, k_max + 1)[:, None]
    freq = k * pitch[None]
    fa, fb = (np.asarray(f, float) * (1 + jitter * rng.uniform(-1, 1, 3)) for f in (formants_a, formants_b))
    amp = np.zeros_like(freq)
    for j, (bw, gain) in enumerate(((90, 1.0), (120, 0.6), (180, 0.3))):
        fj = fa[j] + (fb[j] - fa[j]) * u
        amp += gain / (1 + ((freq - fj[None]) / bw) ** 2)
    amp *= k ** -0.5
    x = (amp * np.sin(k * phase[None] + rng.uniform(0, 6.3, (k_max, 1)))).sum(0)
    return x / (np.sqrt(np.mean(x ** 2)) + 1e-12)


def fricative(rng, n: int, sr: int, lo: float | None = None, hi: float | None = None) -> np.ndarray:
    lo = rng.uniform(1500, 4000) if lo is None else lo
    hi = min(lo * rng.uniform(1.6, 2.5), 0.47 * sr) if hi is None else hi
    return colored_noise(rng, n, 0.0, (lo, hi), sr) * _envelope(n, 0.2, 0.3)


def utterance(rng, sr: int, gen: dict) -> np.ndarray:
    """1-7 syllables at one speaker's pitch and formant scale."""
    f0 = rng.uniform(*gen["f0"])
    scale = rng.uniform(0.88, 1.15)  # vocal-tract length
    names = list(VOWELS)
    parts = []
    for _ in range(int(rng.integers(1, 8))):
        if rng.random() < 0.4:
            parts.append(0.4 * fricative(rng, int(sr * rng.uniform(0.03, 0.12)), sr))
        n = int(sr * rng.uniform(0.06, 0.3))
        va, vb = (np.array(VOWELS[names[rng.integers(len(names))]]) * scale for _ in range(2))
        x = voiced(rng, n, sr, f0 * rng.uniform(0.85, 1.2), va, vb, gen["formant_jitter"], rng.uniform(-0.4, 0.3))
        parts.append(x * _envelope(n, rng.uniform(0.05, 0.3), rng.uniform(0.1, 0.4)))
        if rng.random() < 0.5:
            parts.append(np.zeros(int(sr * rng.uniform(0.01, 0.12))))
    return np.concatenate(parts)


def nonspeech(rng, sr: int, gen: dict) -> np.ndarray:
    """One non-speech event, unit-ish RMS."""
    n = int(sr * rng.uniform(0.2, 1.5))
    kind = rng.integers(5)
    t = np.arange(n) / sr
    if kind == 0:  # noise burst
        x = colored_noise(rng, n, rng.uniform(*gen["alphas"]), sr=sr) * _envelope(n, rng.uniform(0, 0.3), 0.2)
    elif kind == 1:  # mains hum
        base = 50.0 if rng.random() < 0.5 else 60.0
        x = sum(rng.uniform(0.1, 1) / h * np.sin(2 * np.pi * base * h * t + rng.uniform(0, 6.3)) for h in range(1, 6))
    elif kind == 2:  # click train
        x = np.zeros(n)
        x[rng.integers(0, n, int(rng.integers(2, 30)))] = rng.choice([-1.0, 1.0], 1) * 4
    elif kind == 3:  # steady beep
        x = np.sin(2 * np.pi * rng.uniform(300, min(3000, 0.4 * sr)) * t) * _envelope(n, 0.02, 0.02)
    else:  # silence
        x = np.zeros(n)
    return x / (np.sqrt(np.mean(x ** 2)) + 1e-12) if kind != 2 else x


def vad_stream(rng, seconds: float, sr: int, gen: dict) -> tuple[np.ndarray, np.ndarray]:
    """(audio float32 [n], speech mask bool [n]): utterances, non-speech events and pauses
    in sequence over a background noise; speech at -32..-12 dBFS, background SNR below it."""
    n = int(seconds * sr)
    audio, mask = np.zeros(n), np.zeros(n, bool)
    speech_level = rng.uniform(-32, -12)
    bg = colored_noise(rng, n, rng.uniform(*gen["alphas"]), sr=sr)
    audio += bg * db(speech_level - rng.uniform(*gen["snr"]))
    pos = int(rng.integers(0, sr // 2))
    while pos < n:
        kind = rng.choice(3, p=[0.45, 0.3, 0.25])
        if kind == 0:
            seg = utterance(rng, sr, gen) * db(speech_level + rng.uniform(-6, 6))
            mask[pos:pos + len(seg)] = True
        elif kind == 1:
            seg = nonspeech(rng, sr, gen) * db(rng.uniform(-38, -12))
        else:
            seg = np.zeros(int(sr * rng.uniform(0.2, 1.5)))
        m = min(len(seg), n - pos)
        audio[pos:pos + m] += seg[:m]
        pos += m + int(sr * rng.uniform(0.05, 0.6))
    return np.clip(audio, -1, 1).astype(np.float32), mask


def chunk_labels(mask: np.ndarray, chunk: int = 512) -> np.ndarray:
    """Per chunk: 1 when speech covers at least half of it."""
    n = len(mask) // chunk
    return (mask[:n * chunk].reshape(n, chunk).mean(1) >= 0.5).astype(np.float32)


def vad_streams(count: int, seconds: float, sr: int, seed: int, gen: dict, chunk: int = 512):
    """(audio [count, chunks*chunk] float32, labels [count, chunks] float32)."""
    rng = np.random.default_rng([seed, sr, 24])
    audio, labels = [], []
    for _ in range(count):
        a, m = vad_stream(rng, seconds, sr, gen)
        k = len(a) // chunk
        audio.append(a[:k * chunk])
        labels.append(chunk_labels(m, chunk))
    return np.stack(audio), np.stack(labels)


# ----------------------------------------------------------------------------------- KWS

# Keywords: segments of ("v", vowel from, vowel to), ("f", low Hz, high Hz), ("b",) a stop
# burst, ("g",) a closure gap. Pairs share most of their segments so the task is not trivial.
KEYWORDS = {
    "yes": [("v", "i", "e"), ("f", 3500, 7000)],
    "yet": [("v", "i", "e"), ("g",), ("b",)],
    "no": [("v", "er", "o"), ("v", "o", "u")],
    "go": [("b",), ("v", "o", "u")],
    "stop": [("f", 3500, 7000), ("g",), ("b",), ("v", "a", "a"), ("g",), ("b",)],
    "shoe": [("f", 1800, 4000), ("v", "u", "u")],
}
KWS_CLASSES = (*KEYWORDS, "unknown", "silence")
FRAMES, MELS, CLIP = 49, 40, 16000


def _segment(rng, seg, sr: int, f0: float, scale: float, speed: float, jitter: float) -> np.ndarray:
    kind = seg[0]
    if kind == "v":
        n = int(sr * rng.uniform(0.13, 0.22) * speed)
        x = voiced(rng, n, sr, f0, np.array(VOWELS[seg[1]]) * scale, np.array(VOWELS[seg[2]]) * scale, jitter,
                   rng.uniform(-0.3, 0.2))
        return x * _envelope(n, 0.15, 0.25)
    if kind == "f":
        lo = seg[1] * rng.uniform(0.85, 1.15)
        return 0.5 * fricative(rng, int(sr * rng.uniform(0.08, 0.15) * speed), sr, lo, seg[2])
    if kind == "b":
        n = int(sr * 0.02)
        return 1.5 * colored_noise(rng, n, 0.5, sr=sr) * np.exp(-np.arange(n) / (0.004 * sr))
    return np.zeros(int(sr * rng.uniform(0.03, 0.07) * speed))


def _unknown(rng) -> list:
    """A random segment sequence from the same inventory (not one of the keywords)."""
    names = list(VOWELS)
    while True:
        segs = []
        for _ in range(int(rng.integers(1, 4))):
            r = rng.random()
            if r < 0.6:
                segs.append(("v", names[rng.integers(len(names))], names[rng.integers(len(names))]))
            elif r < 0.85:
                lo = float(rng.choice([1800, 3500]))
                segs.append(("f", lo, 2 * lo))
            else:
                segs += [("g",), ("b",)]
        if segs not in KEYWORDS.values():
            return segs


def kws_clip(rng, label: int, gen: dict, sr: int = 16000) -> np.ndarray:
    """One second: a keyword (or unknown word, or nothing) at a random onset over noise."""
    audio = colored_noise(rng, CLIP, rng.uniform(*gen["alphas"]), sr=sr)
    name = KWS_CLASSES[label]
    if name == "silence":
        audio *= db(rng.uniform(-60, -25))
        if rng.random() < 0.5:
            ev = nonspeech(rng, sr, gen)[:CLIP] * db(rng.uniform(-40, -20))
            start = int(rng.integers(0, CLIP - len(ev) + 1))
            audio[start:start + len(ev)] += ev
        return audio.astype(np.float32)
    segs = _unknown(rng) if name == "unknown" else KEYWORDS[name]
    f0, scale, speed = rng.uniform(*gen["f0"]), rng.uniform(0.88, 1.15), rng.uniform(0.75, 1.35)
    word = np.concatenate([_segment(rng, s, sr, f0, scale, speed, gen["formant_jitter"]) for s in segs])[:CLIP]
    level = rng.uniform(-30, -12)
    word *= db(level)
    audio *= db(level - rng.uniform(*gen["snr"]))  # background at the clip's SNR
    start = int(rng.integers(0, CLIP - len(word) + 1))
    audio[start:start + len(word)] += word
    return audio.astype(np.float32)


def mel_filterbank(sr: int = 16000, n_fft: int = 512, mels: int = MELS, lo: float = 20.0, hi: float = 7600.0):
    mel = lambda f: 2595 * np.log10(1 + f / 700)  # noqa: E731
    pts = 700 * (10 ** (np.linspace(mel(lo), mel(hi), mels + 2) / 2595) - 1)
    freqs = np.fft.rfftfreq(n_fft, 1 / sr)
    fb = np.zeros((mels, len(freqs)))
    for m in range(mels):
        a, b, c = pts[m:m + 3]
        fb[m] = np.clip(np.minimum((freqs - a) / (b - a), (c - freqs) / (c - b)), 0, None)
    return fb


def log_mel(audio: np.ndarray, sr: int = 16000) -> np.ndarray:
    """[..., 16000] -> [..., 49, 40]: 25 ms Hann windows every 20 ms, |STFT|^2 (512 points),
    40 mel bands 20-7600 Hz, log10 shifted and scaled to roughly [-2, 2]."""
    win, hop = 400, 320
    idx = np.arange(FRAMES)[:, None] * hop + np.arange(win)[None]
    frames = audio[..., idx] * np.hanning(win)
    power = np.abs(np.fft.rfft(frames, 512)) ** 2
    mel = power @ mel_filterbank(sr).T
    return ((np.log10(mel + 1e-6) + 2.0) / 2.0).astype(np.float32)


def kws_dataset(n: int, seed: int, gen: dict) -> tuple[np.ndarray, np.ndarray]:
    """(features [n, 49, 40] float32, labels [n] int64), classes balanced and shuffled."""
    rng = np.random.default_rng([seed, 49])
    labels = rng.permutation(np.arange(n) % len(KWS_CLASSES)).astype(np.int64)
    feats = np.empty((n, FRAMES, MELS), np.float32)
    for start in range(0, n, 256):
        clips = np.stack([kws_clip(rng, int(c), gen) for c in labels[start:start + 256]])
        feats[start:start + len(clips)] = log_mel(clips)
    return feats, labels


# --------------------------------------------------------------------- cached data sets

def cached(name: str, make) -> dict[str, np.ndarray]:
    """CACHE/name.npz, made by make() (a dict of arrays) the first time."""
    path = CACHE / f"{name}.npz"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, **make())
    with np.load(path) as d:
        return dict(d)


def vad_eval(sr: int) -> dict[str, np.ndarray]:
    """Held-out VAD streams: 16 x 30 s at 16 kHz, or 16 x 60 s at 8 kHz (937 chunks each way)."""
    return cached(f"vad_eval_{sr}", lambda: dict(zip(("audio", "labels"), vad_streams(
        16, 30.0 * 16000 / sr, sr, SEEDS["eval"], GEN["eval"]))))


def kws_data(split: str, n: int) -> dict[str, np.ndarray]:
    """n KWS clips of split "calib" or "eval": {feats, labels}."""
    gen = GEN["eval" if split == "eval" else "calib"]
    return cached(f"kws_{split}_{n}", lambda: dict(zip(("feats", "labels"), kws_dataset(n, SEEDS[split], gen))))
