"""Reference (numpy) implementation of the LoRA-dropout RNG specified in RNG.md.

This file is the executable form of RNG.md: the Ascend kernel
(op_kernel/lora_fused_common.h) and the CPU kernel must produce the same keep mask
for the same (seed, offset, shape, p). Keep the three in sync.

Counter-based: nothing is stored between forward and backward; the backward pass
regenerates the same mask from (seed, offset).
"""
import numpy as np

# Threefry-2x32, 20 rounds (Salmon et al., "Parallel random numbers: as easy as
# 1, 2, 3", SC'11; Random123). Rotation constants R_32x2 and the key-schedule parity.
THREEFRY_ROTATIONS = (13, 15, 26, 6, 17, 29, 16, 24)
THREEFRY_PARITY = 0x1BD11BDA
THREEFRY_ROUNDS = 20
# Uniform: the top 24 bits of the selected 32-bit word.
UNIFORM_BITS = 24

# Known answers from Random123's kat_vectors (threefry2x32, 20 rounds):
# (counter words, key words) -> output words.
KAT_VECTORS = (
    ((0x00000000, 0x00000000), (0x00000000, 0x00000000), (0x6B200159, 0x99BA4EFE)),
    ((0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF), (0x1CB996FC, 0xBB002BE7)),
    ((0x243F6A88, 0x85A308D3), (0x13198A2E, 0x03707344), (0xC4923A9C, 0x483DF7A0)),
)

_M32 = np.uint64(0xFFFFFFFF)


def _rotl32(x, r):
    return (x << np.uint32(r)) | (x >> np.uint32(32 - r))


def threefry2x32(c0, c1, k0, k1):
    """Threefry-2x32-20 on uint32 arrays (broadcast); returns (x0, x1) as uint32."""
    with np.errstate(over="ignore"):
        c0 = np.asarray(c0, dtype=np.uint32)
        c1 = np.asarray(c1, dtype=np.uint32)
        k0 = np.asarray(k0, dtype=np.uint32)
        k1 = np.asarray(k1, dtype=np.uint32)
        ks = (k0, k1, k0 ^ k1 ^ np.uint32(THREEFRY_PARITY))
        x0 = c0 + ks[0]
        x1 = c1 + ks[1]
        for i in range(THREEFRY_ROUNDS):
            x0 = x0 + x1
            x1 = _rotl32(x1, THREEFRY_ROTATIONS[i % 8])
            x1 = x1 ^ x0
            if i % 4 == 3:
                s = (i + 1) // 4
                x0 = x0 + ks[s % 3]
                x1 = x1 + ks[(s + 1) % 3] + np.uint32(s)
        return x0, x1


def split_seed(seed):
    """The int64 seed's two's-complement bits as (k0 = low word, k1 = high word)."""
    s = int(seed) & 0xFFFFFFFFFFFFFFFF
    return np.uint32(s & 0xFFFFFFFF), np.uint32(s >> 32)


def element_words(gidx, seed):
    """The 32-bit random word of each global element index (uint64 array)."""
    g = np.asarray(gidx, dtype=np.uint64)
    b = g >> np.uint64(1)                      # one Threefry call per pair of elements
    lane = (g & np.uint64(1)).astype(bool)     # even index -> word 0, odd -> word 1
    c0 = (b & _M32).astype(np.uint32)
    c1 = (b >> np.uint64(32)).astype(np.uint32)
    k0, k1 = split_seed(seed)
    w0, w1 = threefry2x32(c0, c1, k0, k1)
    return np.where(lane, w1, w0)


def drop_threshold(p):
    """Integer threshold: keep iff (word >> 8) >= ceil(float32(p) * 2**24)."""
    p32 = np.float32(p)
    if not (0.0 <= float(p32) < 1.0):
        raise ValueError(f"dropout p must be in [0, 1), got {p!r}")
    return int(np.ceil(np.float64(p32) * (1 << UNIFORM_BITS)))


def global_index(rows, cols, in_features, offset):
    """g = offset + row * in_features + col, modulo 2**64 (rows/cols broadcast)."""
    with np.errstate(over="ignore"):
        r = np.asarray(rows, dtype=np.uint64)
        c = np.asarray(cols, dtype=np.uint64)
        off = np.uint64(int(offset) & 0xFFFFFFFFFFFFFFFF)
        return off + r * np.uint64(in_features) + c


def keep_mask_block(row0, nrows, col0, ncols, in_features, p, seed, offset):
    """Keep mask (bool [nrows, ncols]) of the block x[row0:row0+nrows, col0:col0+ncols]."""
    if float(np.float32(p)) == 0.0:
        return np.ones((nrows, ncols), dtype=bool)
    thr = drop_threshold(p)
    rows = np.arange(row0, row0 + nrows, dtype=np.uint64)[:, None]
    cols = np.arange(col0, col0 + ncols, dtype=np.uint64)[None, :]
    words = element_words(global_index(rows, cols, in_features, offset), seed)
    # p < 1 in float32 means thr <= 2**24 - 1: some words are always kept.
    return (words >> np.uint32(32 - UNIFORM_BITS)) >= np.uint32(thr)


def keep_mask(n, in_features, p, seed, offset):
    """Keep mask (bool [n, in_features]) of a whole x of n rows."""
    return keep_mask_block(0, n, 0, in_features, in_features, p, seed, offset)


def effective_scale(scale, p):
    """s_eff = float32(s) / (1 - float32(p)), all in float32 (RNG.md, "Scaling")."""
    s32 = np.float32(scale)
    p32 = np.float32(p)
    return np.float32(s32 / (np.float32(1.0) - p32))


# ---- step-by-step mirror of the kernel's vector RNG (lora_fused_common.h, KeepRow) ----

def _u16(a):
    return a.view(np.uint16)


def kernel_keep_row(g_start, cols, p, seed):
    """keep (float32 0/1, [cols]) for global indices g_start + j, computed the way
    VecTools::KeepRow does it: 32-bit lane arithmetic, xor built from and/or/not on the
    uint16 view, word select through a mask, clamp instead of compare. Returns
    (keep, path) with path "vector" or "scalar" (low counter word wraps in the row)."""
    g_start = int(g_start) % 2**64
    thr = drop_threshold(p)
    one_minus_thr = np.float32(1.0) - np.float32(thr)
    k0, k1 = (int(v) for v in split_seed(seed))
    b = g_start >> 1
    par = g_start & 1
    b_lo, b_hi = b & 0xFFFFFFFF, b >> 32
    if b_lo + ((par + cols - 1) >> 1) > 0xFFFFFFFF:
        keep = np.array([1.0 if (int(w) >> 8) >= thr else 0.0 for w in
                         element_words(np.arange(cols, dtype=np.uint64) + np.uint64(g_start), seed)],
                        dtype=np.float32)
        return keep, "scalar"
    with np.errstate(over="ignore"):
        idx = (np.arange(cols, dtype=np.int64) + par).astype(np.int32)          # CreateVecIndex
        t1 = idx.view(np.uint32) >> np.uint32(1)                                  # ShiftRight
        t2 = t1 << np.uint32(1)                                                   # ShiftLeft
        lane = idx - t2.view(np.int32)                                            # Sub
        x0 = (t1.view(np.int32) + np.int32(np.uint32((b_lo + k0) & 0xFFFFFFFF).view(np.int32))).view(np.uint32)
        x1 = np.full(cols, np.uint32((b_hi + k1) & 0xFFFFFFFF), dtype=np.uint32)  # Duplicate
        ks = (k0, k1, k0 ^ k1 ^ THREEFRY_PARITY)
        for i in range(THREEFRY_ROUNDS):
            x0 = (x0.view(np.int32) + x1.view(np.int32)).view(np.uint32)          # Add (int32, wraps)
            r = THREEFRY_ROTATIONS[i % 8]
            a, c = x1 << np.uint32(r), x1 >> np.uint32(32 - r)                    # rotl = shl | shr
            x1 = (_u16(a) | _u16(c)).view(np.uint32)
            t_and = _u16(x1) & _u16(x0)                                           # xor = (a|b) & ~(a&b)
            t_or = _u16(x1) | _u16(x0)
            x1 = (t_or & ~t_and).view(np.uint32)
            if i % 4 == 3:
                s = (i + 1) // 4
                x0 = (x0.view(np.int32) + np.uint32(ks[s % 3]).view(np.int32)).view(np.uint32)
                x1 = (x1.view(np.int32) + np.uint32((ks[(s + 1) % 3] + s) & 0xFFFFFFFF).view(np.int32)
                      ).view(np.uint32)
        m = (np.zeros(cols, np.int32) - lane).view(np.uint32)                     # m = -lane
        word = ((_u16(x0) & ~_u16(m)) | (_u16(x1) & _u16(m))).view(np.uint32)
        u24 = (word >> np.uint32(8)).view(np.int32).astype(np.float32)           # Cast int32 -> float
        keep = np.minimum(np.maximum(u24 + one_minus_thr, np.float32(0)), np.float32(1))
    return keep.astype(np.float32), "vector"
