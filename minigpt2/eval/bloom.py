"""A Bloom filter of word 8-grams, hashed with vectorised NumPy (§4 of the paper).

GPT-2's authors put every 8-gram of WebText's training text into Bloom filters, the text first
normalised to lower-case alphanumeric words separated by single spaces, with a false-positive
rate bounded by 1e-8; then they asked which 8-grams of each test set the filters contain.

The pipeline here, all of it array code except the one regex that finds the words:

    text ──normalize──> "the cat sat on ..."          lower-case alphanumeric words, one space apart
         ──bytes──────> b (N,) uint8
         ──word_hashes> w (W,) uint64                  a 64-bit hash per word (polynomial, mod 2^64)
         ──ngram_hashes> g (W-7,) uint64               one 64-bit hash per 8 consecutive words
         ──BloomFilter.add / .contains                 k bit positions per 8-gram (double hashing)

Sizing (the closed-form optimum for n items and a false-positive rate p):

    m = ceil(-n ln p / (ln 2)^2)  bits,        k = round((m / n) ln 2)  hash functions

at which a filter holding n items answers "present" for an absent item with probability about
(1 - e^{-kn/m})^k ≈ p. For n = 1e6 and p = 1e-8 that is 38.3 million bits (4.8 MB) and k = 27.
"""

from __future__ import annotations

import json
import math
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
import regex

N = 8                                              # the paper's n-gram length
_WORD = regex.compile(r"[\p{L}\p{N}]+")            # alphanumeric runs: letters and digits
_U64 = np.uint64
_MASK64 = (1 << 64) - 1
_P = _U64(0x100000001B3)                           # odd multiplier of the per-word polynomial
_P_INV = _U64(pow(0x100000001B3, -1, 1 << 64))     # its inverse mod 2^64 (exists: _P is odd)
_Q = _U64(0x9E3779B97F4A7C15)                      # multiplier combining the 8 word hashes
FORMAT = "minigpt2-bloom-1"
# The most hashes a filter can have: optimal_size gives k ≈ -log2(rate), and the smallest rate
# above 0 a float holds is ~5e-324 (k = 1074). A header with more is damaged, not a filter.
MAX_K = 1100


def normalize(text: str) -> str:
    """Lower-case alphanumeric words, single spaces between (§4): "It's 3 PM!" -> "it s 3 pm"."""
    return " ".join(_WORD.findall(text.lower()))


def _mix(h):
    """splitmix64's finaliser: every input bit affects every output bit (uint64 arrays wrap)."""
    with np.errstate(over="ignore"):
        h = h ^ (h >> _U64(30))
        h = h * _U64(0xBF58476D1CE4E5B9)
        h = h ^ (h >> _U64(27))
        h = h * _U64(0x94D049BB133111EB)
        return h ^ (h >> _U64(31))


def word_hashes(normalized: str) -> np.ndarray:
    """(W,) uint64: a hash of each word of a normalised text, independent of where it stands.

    With b the UTF-8 bytes and the prefix sums H[i] = sum_{j<i} (b[j]+1) P^j (mod 2^64), a word
    spanning bytes [s, e) hashes to (H[e] - H[s]) P^{-s} = sum_j (b[s+j]+1) P^j: the same value
    wherever the word stands, computed for all words at once. Then mixed by splitmix64.
    """
    b = np.frombuffer(normalized.encode("utf-8"), dtype=np.uint8)
    if b.size == 0:
        return np.zeros(0, dtype=np.uint64)
    with np.errstate(over="ignore"):
        powers = np.empty(b.size + 1, dtype=np.uint64)             # P^0 .. P^N
        powers[0] = 1
        np.cumprod(np.full(b.size, _P, dtype=np.uint64), out=powers[1:])
        inv_powers = np.empty(b.size + 1, dtype=np.uint64)
        inv_powers[0] = 1
        np.cumprod(np.full(b.size, _P_INV, dtype=np.uint64), out=inv_powers[1:])
        prefix = np.zeros(b.size + 1, dtype=np.uint64)
        np.cumsum((b.astype(np.uint64) + _U64(1)) * powers[:-1], out=prefix[1:])
        spaces = np.flatnonzero(b == 32)
        starts = np.concatenate(([0], spaces + 1))
        ends = np.concatenate((spaces, [b.size]))
        h = (prefix[ends] - prefix[starts]) * inv_powers[starts]
    return _mix(h)


def ngram_hashes(words: np.ndarray, n: int = N) -> np.ndarray:
    """(W - n + 1,) uint64: a hash of each run of n consecutive word hashes (none if W < n).

    g[i] = mix(sum_k words[i+k] Q^k mod 2^64): order matters, so "a b" and "b a" differ."""
    count = words.size - n + 1
    if count <= 0:
        return np.zeros(0, dtype=np.uint64)
    g = np.zeros(count, dtype=np.uint64)
    q = _U64(1)
    with np.errstate(over="ignore"):
        for k in range(n):
            g += words[k:k + count] * q
            q = q * _Q
    return _mix(g)


def text_ngram_hashes(text: str, n: int = N) -> np.ndarray:
    """The n-gram hashes of a raw text: normalize, then word_hashes, then ngram_hashes."""
    return ngram_hashes(word_hashes(normalize(text)), n)


def optimal_size(n_items: int, rate: float) -> tuple[int, int]:
    """(m bits, k hashes): the closed-form optimum for n_items at false-positive rate ``rate``."""
    if isinstance(n_items, bool) or not isinstance(n_items, (int, np.integer)) or n_items < 1:
        raise ValueError(f"the number of items must be an integer >= 1, got {n_items!r}")
    if not 0.0 < rate < 1.0:
        raise ValueError(f"the false-positive rate must be in (0, 1), got {rate!r}")
    m = math.ceil(-n_items * math.log(rate) / math.log(2) ** 2)
    k = max(1, round(m / n_items * math.log(2)))
    return m, k


class BloomFilter:
    """A set of 64-bit keys that may answer "present" wrongly (rate ~p) but never "absent" wrongly.

    ``m`` bits, ``k`` positions per key by double hashing (Kirsch & Mitzenmacher 2006):
    pos_i = (h1 + i·h2) mod m, i = 0..k-1, with h1, h2 two mixes of the key (h2 odd).
    """

    CHUNK = 1 << 16                                 # keys per vectorised step (k·8 bytes each)

    def __init__(self, m: int, k: int):
        if m < 1 or k < 1:
            raise ValueError(f"a Bloom filter needs m >= 1 bits and k >= 1 hashes, got {m}, {k}")
        self.m, self.k = int(m), int(k)
        self.bits = np.zeros((self.m + 7) // 8, dtype=np.uint8)
        self.n_added = 0                            # keys added (with repeats), for the report

    @classmethod
    def for_items(cls, n_items: int, rate: float = 1e-8) -> "BloomFilter":
        """The smallest filter holding ``n_items`` with a false-positive rate of ``rate``."""
        return cls(*optimal_size(n_items, rate))

    def __repr__(self):
        return (f"BloomFilter(m={self.m}, k={self.k}, {self.bits.nbytes / 2**20:.1f} MiB, "
                f"{self.n_added} added)")

    def _positions(self, keys: np.ndarray):
        """(len(keys), k) bit positions -> (byte index, bit mask) arrays of that shape."""
        with np.errstate(over="ignore"):
            h1 = _mix(keys ^ _U64(0xA0761D6478BD642F))
            h2 = _mix(keys ^ _U64(0xE7037ED1A0B428DB)) | _U64(1)
            i = np.arange(self.k, dtype=np.uint64)
            pos = (h1[:, None] + i[None, :] * h2[:, None]) % _U64(self.m)
        return (pos >> _U64(3)).astype(np.intp), np.left_shift(1, (pos & _U64(7))).astype(np.uint8)

    def add(self, keys) -> None:
        """Insert uint64 keys (e.g. ``ngram_hashes``)."""
        keys = np.asarray(keys, dtype=np.uint64).ravel()
        for s in range(0, keys.size, self.CHUNK):
            byte, mask = self._positions(keys[s:s + self.CHUNK])
            np.bitwise_or.at(self.bits, byte.ravel(), mask.ravel())
        self.n_added += int(keys.size)

    def contains(self, keys) -> np.ndarray:
        """(len(keys),) bool: True where every one of the key's k bits is set."""
        keys = np.asarray(keys, dtype=np.uint64).ravel()
        out = np.empty(keys.size, dtype=bool)
        for s in range(0, keys.size, self.CHUNK):
            byte, mask = self._positions(keys[s:s + self.CHUNK])
            out[s:s + self.CHUNK] = ((self.bits[byte] & mask) != 0).all(axis=1)
        return out

    def fill_ratio(self) -> float:
        """The share of bits set (about 1/2 at the designed load with the optimal k)."""
        return float(np.unpackbits(self.bits)[:self.m].mean()) if self.m else 0.0

    def expected_rate(self) -> float:
        """(1 - e^{-k n / m})^k for the keys added so far (repeats counted, so an upper bound)."""
        return (1.0 - math.exp(-self.k * self.n_added / self.m)) ** self.k

    # --- files ---------------------------------------------------------------------------------

    def save(self, path) -> None:
        """One .npz file (no pickle): the bits plus a JSON header with m, k and the count."""
        path = Path(path)
        header = json.dumps({"format": FORMAT, "m": self.m, "k": self.k, "n_added": self.n_added,
                             "ngram": N})
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            np.savez(f, bits=self.bits, header=np.frombuffer(header.encode(), dtype=np.uint8))
        tmp.replace(path)

    @classmethod
    def load(cls, path) -> "BloomFilter":
        """The filter ``save`` wrote. A file that is missing, empty, cut short, altered (the zip
        archive's CRC-32 catches a changed bit) or holds a header no filter has is refused with
        one line naming the file and what is wrong."""
        path = Path(path)
        build = "build it again with 'python -m minigpt2 overlap build'"
        if not path.is_file():
            raise FileNotFoundError(f"Bloom filter file {path} not found; build one with "
                                    "'python -m minigpt2 overlap build'")
        if path.stat().st_size == 0:
            raise ValueError(f"{path} is empty (0 bytes), not a Bloom filter file; {build}")
        with open(path, "rb") as f:
            start = f.read(4)
        is_zip = b"PK\x03\x04".startswith(start)         # how every .npz archive begins
        try:
            with np.load(path, allow_pickle=False) as z:
                header = json.loads(z["header"].tobytes().decode())
                bits = z["bits"]
        except (OSError, ValueError, KeyError, IndexError, TypeError, AttributeError, EOFError,
                NotImplementedError, RuntimeError, zipfile.BadZipFile, zlib.error,
                struct.error) as e:   # what zipfile and NumPy raise on a damaged archive
            # (NumPy's own message would suggest allow_pickle: never for a file of ours)
            if not is_zip:
                raise ValueError(f"{path} is not a minigpt2 Bloom filter file (not an .npz "
                                 f"archive holding 'bits' and 'header'); {build}") from None
            raise ValueError(f"{path} is truncated or damaged ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else 'unreadable'}); "
                             f"{build}") from None
        m, k = (header.get("m"), header.get("k")) if isinstance(header, dict) else (None, None)
        n_added = header.get("n_added", 0) if isinstance(header, dict) else None
        if header.get("format") != FORMAT if isinstance(header, dict) else True:
            raise ValueError(f"{path} is not a minigpt2 Bloom filter file (its header names no "
                             f"{FORMAT!r} format); {build}")
        if not _is_count(m, 1) or bits.shape != ((m + 7) // 8,):
            raise ValueError(f"{path} is damaged: {bits.size} bytes of bits for m = {m!r}; "
                             f"{build}")
        if not _is_count(k, 1) or k > MAX_K:
            raise ValueError(f"{path} is damaged: its header says k = {k!r} hashes, and a filter "
                             f"has 1 to {MAX_K}; {build}")
        if not _is_count(n_added, 0):
            raise ValueError(f"{path} is damaged: its header says n_added = {n_added!r}; {build}")
        f = cls(m, k)
        f.bits = bits.astype(np.uint8, copy=False)
        f.n_added = n_added
        return f


def _is_count(value, low: int) -> bool:
    """An int (not a bool, which JSON's true would give) >= low."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= low
