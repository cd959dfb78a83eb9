/*
 * nec_serve._rans: a byte-exact, bounds-checked re-implementation of the rANS
 * coder that CompressAI 1.2.8 uses (compressai.ans.RansEncoder /
 * RansDecoder .encode_with_indexes / .decode_with_indexes).
 *
 * Bitstream (identical to CompressAI's):
 *   - 64-bit state, lower bound L = 2^31, renormalisation by 32-bit words;
 *   - each symbol is coded with its channel's quantized CDF (precision bits);
 *     value = symbol - offset[channel]; values outside [0, max_value) with
 *     max_value = cdf_length - 2 are coded as the escape symbol max_value,
 *     followed by "bypass" 4-bit chunks: the number n of raw chunks (as a
 *     run of 15s plus a remainder < 15), then n chunks of the zig-zag-like
 *     raw value (value < 0: -2v-1, value >= max_value: 2(v-max_value)),
 *     least significant chunk first;
 *   - symbols are coded in reverse so that the decoder reads forward; words
 *     are written backwards, the final state is flushed as two words (low
 *     first) and the stream is the little-endian words from there to the end.
 *
 * Differences from CompressAI, all on inputs where CompressAI misbehaves:
 *   - the encoder rejects values below -2^26 or above max_value + 2^26 (the
 *     CompressAI bypass loop never terminates for raw values >= 2^28, and its
 *     int32 arithmetic overflows near the int32 limits);
 *   - every index is checked against the number of channels, and the tables
 *     are validated (rows start at 0, end at 2^precision, strictly increase,
 *     cdf_length >= 3, which CompressAI's tables always satisfy);
 *   - the decoder never reads outside the data, rejects streams whose length
 *     is not a multiple of 4 or shorter than 8 bytes, rejects more than 8 raw
 *     bypass chunks, decoded values outside int32, and streams that are not
 *     consumed exactly (a valid stream ends with the state back at L and no
 *     words left over).
 *
 * Speed: the encoder uses exact reciprocal division (Alverson's method as in
 * ryg_rans' Rans64EncSymbolInit; exact for states below 2^63) precomputed per
 * (channel, value); the decoder looks the top bits of the cumulative frequency
 * up in a per-channel bucket table that gives symbol, start and frequency
 * directly unless the bucket straddles a symbol boundary (then a short scan of
 * the CDF follows).  Both are built once per Tables object.  The GIL is
 * released while coding.
 *
 * Batches: encode_tiles and decode_tiles code a whole (B, rows, tokens) batch in one call
 * (row r with channel r, no index array), two tiles at a time with their symbols
 * interleaved: each symbol waits on the one before it in its stream, so two independent
 * streams nearly double the symbols coded per cycle.  encode_tiles also counts the
 * entropy bound and the rounding error of the latents in the same pass.  A pair with a bad
 * tile is coded again one tile at a time, so errors name the first bad tile or stream
 * exactly as tile-by-tile calls would.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define RANS_L (1ull << 31)
#define BYPASS_BITS 4u
#define BYPASS_MAX 15u
/* Renormalisation bound of a 4-bit bypass chunk: ((L >> 16) << 32) << 12. */
#define BYPASS_XMAX (RANS_L << 28)
#define MAX_BYPASS_CHUNKS 8
#define VALUE_SLACK (1ll << 26)
/* 128 buckets per channel (1 KiB): small enough that the tables of 768 channels
 * stay in L2, fine enough that most cumulative frequencies hit a bucket that
 * lies inside one symbol's interval. */
#define BUCKET_BITS_MAX 7

#if defined(__GNUC__) || defined(__clang__)
#define LIKELY(x) __builtin_expect(!!(x), 1)
#define UNLIKELY(x) __builtin_expect(!!(x), 0)
#else
#define LIKELY(x) (x)
#define UNLIKELY(x) (x)
#endif

#if !defined(__SIZEOF_INT128__)
#error "a compiler with unsigned __int128 support is required"
#endif

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
#define HOST_BIG_ENDIAN 1
#else
#define HOST_BIG_ENDIAN 0
#endif

static PyObject *DecodeError; /* nec_serve._rans.DecodeError (ValueError) */

__extension__ typedef unsigned __int128 u128;

static inline uint64_t mulhi64(uint64_t a, uint64_t b) {
    return (uint64_t)(((u128)a * b) >> 64);
}

static inline uint32_t load_le32(const unsigned char *p) {
    uint32_t v;
    memcpy(&v, p, 4);
#if HOST_BIG_ENDIAN
    v = __builtin_bswap32(v);
#endif
    return v;
}

static inline uint32_t to_le32(uint32_t v) {
#if HOST_BIG_ENDIAN
    return __builtin_bswap32(v);
#else
    return v;
#endif
}

/* ------------------------------------------------------------------------ */
/* Tables                                                                   */

/* Encoder symbol: x' = x + bias + (mulhi(x, rcp) >> shift) * cmpl, which equals
 * (x / freq) * M + x % freq + start for every x < 2^63. */
typedef struct {
    uint64_t rcp;
    uint32_t bias;
    uint16_t cmpl; /* M - freq */
    uint8_t shift;
    uint8_t pad;
} EncSym;

typedef struct {
    const EncSym *enc;      /* max_value + 1 entries (value max_value = escape) */
    const uint32_t *cdf;    /* cdf_length entries */
    /* 1 << bucket_bits entries, one per range of cumulative frequencies: the
     * symbol s whose interval holds the range start in bits 32..47, and when the
     * whole range lies in that interval (bit 63 clear) also cdf[s] in bits 0..15
     * and its frequency in bits 16..31. */
    const uint64_t *bucket;
    /* max_value + 1 entries: the ideal cost in bits of each value, -log2(freq / M),
     * for the entropy bound (value max_value = escape, before its bypass chunks). */
    const double *bits;
    int32_t offset;
    int32_t max_value;
} Chan;

typedef struct {
    PyObject_HEAD
    Py_ssize_t channels;
    Py_ssize_t max_length;
    int precision;
    int bucket_shift; /* precision - bucket_bits */
    Chan *chan;
    EncSym *enc_mem;
    uint32_t *cdf_mem;
    uint64_t *bucket_mem;
    double *bits_mem;
} TablesObject;

static void enc_sym_init(EncSym *s, uint32_t start, uint32_t freq, int precision) {
    uint32_t m = 1u << precision;
    s->cmpl = (uint16_t)(m - freq);
    s->pad = 0;
    if (freq < 2) {
        /* q = mulhi(x, 2^64 - 1) = x - 1 for x >= 1, see ryg_rans. */
        s->rcp = ~0ull;
        s->shift = 0;
        s->bias = start + m - 1;
    } else {
        uint32_t shift = 0;
        while (freq > (1u << shift)) shift++;
        /* ceil(2^(shift + 63) / freq), computed as two 64:64 divisions. */
        uint64_t x1 = 1ull << (shift + 31);
        uint64_t t1 = x1 / freq;
        uint64_t x0 = (uint64_t)(freq - 1) + ((x1 % freq) << 32);
        uint64_t t0 = x0 / freq;
        s->rcp = t0 + (t1 << 32);
        s->shift = (uint8_t)(shift - 1);
        s->bias = start;
    }
}

typedef struct {
    Py_buffer view;
    int held;
} Buf;

static void buf_release(Buf *b) {
    if (b->held) {
        PyBuffer_Release(&b->view);
        b->held = 0;
    }
}

/* Acquire a C-contiguous buffer of int32 items. */
static int get_int32_buffer(PyObject *obj, Buf *b, const char *name, int writable) {
    int flags = PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0);
    if (PyObject_GetBuffer(obj, &b->view, flags) < 0) {
        PyErr_Clear();
        PyErr_Format(PyExc_TypeError,
                     "%s must be a C-contiguous%s int32 buffer (e.g. a numpy int32 array), "
                     "got %.100s",
                     name, writable ? " writable" : "", Py_TYPE(obj)->tp_name);
        return -1;
    }
    b->held = 1;
    const char *f = b->view.format ? b->view.format : "B";
    if (*f == '@' || *f == '=' || (*f == '<' && !HOST_BIG_ENDIAN) || (*f == '>' && HOST_BIG_ENDIAN))
        f++;
    int ok = b->view.itemsize == 4 && f[1] == '\0' && (f[0] == 'i' || (f[0] == 'l' && sizeof(long) == 4));
    if (!ok) {
        PyErr_Format(PyExc_TypeError, "%s must hold native int32 items, got format '%s' itemsize %zd",
                     name, b->view.format ? b->view.format : "B", b->view.itemsize);
        buf_release(b);
        return -1;
    }
    return 0;
}

static void tables_free_mem(TablesObject *t) {
    PyMem_Free(t->chan);
    PyMem_Free(t->enc_mem);
    PyMem_Free(t->cdf_mem);
    PyMem_Free(t->bucket_mem);
    PyMem_Free(t->bits_mem);
    t->bits_mem = NULL;
    t->chan = NULL;
    t->enc_mem = NULL;
    t->cdf_mem = NULL;
    t->bucket_mem = NULL;
}

static void tables_dealloc(TablesObject *t) {
    tables_free_mem(t);
    Py_TYPE(t)->tp_free((PyObject *)t);
}

/* Validate the raw tables and build encoder and decoder structures. */
static int tables_build(TablesObject *t, const int32_t *cdfs, const int32_t *lengths,
                        const int32_t *offsets, Py_ssize_t c, Py_ssize_t max_length, int precision) {
    const int64_t top = 1ll << precision;
    int64_t total = 0;
    for (Py_ssize_t i = 0; i < c; i++) {
        int32_t len = lengths[i];
        if (len < 3 || len > max_length) {
            PyErr_Format(PyExc_ValueError, "cdf_lengths[%zd] = %d is outside [3, %zd]", i, (int)len,
                         max_length);
            return -1;
        }
        const int32_t *row = cdfs + i * max_length;
        if (row[0] != 0) {
            PyErr_Format(PyExc_ValueError, "CDF row %zd starts at %d, expected 0", i, (int)row[0]);
            return -1;
        }
        if (row[len - 1] != top) {
            PyErr_Format(PyExc_ValueError, "CDF row %zd ends at %d, expected %lld", i,
                         (int)row[len - 1], (long long)top);
            return -1;
        }
        for (int32_t j = 1; j < len; j++) {
            if (row[j] <= row[j - 1]) {
                PyErr_Format(PyExc_ValueError,
                             "CDF row %zd is not strictly increasing at entry %d (%d <= %d)", i,
                             (int)j, (int)row[j], (int)row[j - 1]);
                return -1;
            }
        }
        if ((int64_t)offsets[i] + len - 2 > INT32_MAX) {
            PyErr_Format(PyExc_ValueError, "offsets[%zd] = %d overflows int32 with %d symbols", i,
                         (int)offsets[i], (int)len - 1);
            return -1;
        }
        total += len;
    }

    int bucket_bits = precision < BUCKET_BITS_MAX ? precision : BUCKET_BITS_MAX;
    size_t nbucket = (size_t)1 << bucket_bits;
    t->bucket_shift = precision - bucket_bits;
    t->chan = PyMem_Calloc((size_t)c, sizeof(Chan));
    t->enc_mem = PyMem_Calloc((size_t)total, sizeof(EncSym));
    t->cdf_mem = PyMem_Calloc((size_t)total, sizeof(uint32_t));
    t->bucket_mem = PyMem_Calloc((size_t)c * nbucket, sizeof(uint64_t));
    t->bits_mem = PyMem_Calloc((size_t)total, sizeof(double));
    if (!t->chan || !t->enc_mem || !t->cdf_mem || !t->bucket_mem || !t->bits_mem) {
        tables_free_mem(t);
        PyErr_NoMemory();
        return -1;
    }

    size_t pos = 0;
    for (Py_ssize_t i = 0; i < c; i++) {
        int32_t len = lengths[i];
        const int32_t *row = cdfs + i * max_length;
        Chan *ch = &t->chan[i];
        EncSym *enc = t->enc_mem + pos;
        uint32_t *cdf = t->cdf_mem + pos;
        uint64_t *bucket = t->bucket_mem + (size_t)i * nbucket;
        for (int32_t j = 0; j < len; j++) cdf[j] = (uint32_t)row[j];
        double *bits = t->bits_mem + pos;
        for (int32_t j = 0; j + 1 < len; j++) {
            enc_sym_init(&enc[j], cdf[j], cdf[j + 1] - cdf[j], precision);
            bits[j] = (double)precision - log2((double)(cdf[j + 1] - cdf[j]));
        }
        int32_t s = 0;
        for (size_t b = 0; b < nbucket; b++) {
            uint32_t lo = (uint32_t)(b << t->bucket_shift);
            uint32_t hi = lo + (1u << t->bucket_shift) - 1;
            while (s + 1 < len - 1 && cdf[s + 1] <= lo) s++;
            uint64_t e = (uint64_t)s << 32;
            if (cdf[s + 1] > hi)
                e |= (uint64_t)cdf[s] | ((uint64_t)(cdf[s + 1] - cdf[s]) << 16);
            else
                e |= 1ull << 63;
            bucket[b] = e;
        }
        ch->enc = enc;
        ch->cdf = cdf;
        ch->bucket = bucket;
        ch->bits = bits;
        ch->offset = offsets[i];
        ch->max_value = len - 2;
        pos += (size_t)len;
    }
    return 0;
}

static int tables_init(TablesObject *t, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"cdfs", "cdf_lengths", "offsets", "max_length", "precision", NULL};
    PyObject *o_cdfs, *o_len, *o_off;
    Py_ssize_t max_length;
    int precision = 16;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOOn|i:Tables", kwlist, &o_cdfs, &o_len, &o_off,
                                     &max_length, &precision))
        return -1;
    if (t->chan) {
        PyErr_SetString(PyExc_RuntimeError, "Tables is already initialised");
        return -1;
    }
    if (precision < 1 || precision > 16) {
        PyErr_Format(PyExc_ValueError, "precision must be in [1, 16], got %d", precision);
        return -1;
    }
    if (max_length < 3 || max_length > (1 << 24)) {
        PyErr_Format(PyExc_ValueError, "max_length must be in [3, 2^24], got %zd", max_length);
        return -1;
    }
    Buf cdfs = {0}, len = {0}, off = {0};
    int rc = -1;
    if (get_int32_buffer(o_cdfs, &cdfs, "cdfs", 0) < 0) goto done;
    if (get_int32_buffer(o_len, &len, "cdf_lengths", 0) < 0) goto done;
    if (get_int32_buffer(o_off, &off, "offsets", 0) < 0) goto done;
    Py_ssize_t c = len.view.len / 4;
    if (c < 1) {
        PyErr_SetString(PyExc_ValueError, "cdf_lengths is empty: need at least one channel");
        goto done;
    }
    if (off.view.len / 4 != c) {
        PyErr_Format(PyExc_ValueError, "offsets has %zd entries, cdf_lengths %zd",
                     off.view.len / 4, c);
        goto done;
    }
    if (cdfs.view.len / 4 != c * max_length) {
        PyErr_Format(PyExc_ValueError, "cdfs has %zd entries, expected channels * max_length = %zd",
                     cdfs.view.len / 4, c * max_length);
        goto done;
    }
    t->channels = c;
    t->max_length = max_length;
    t->precision = precision;
    rc = tables_build(t, (const int32_t *)cdfs.view.buf, (const int32_t *)len.view.buf,
                      (const int32_t *)off.view.buf, c, max_length, precision);
done:
    buf_release(&cdfs);
    buf_release(&len);
    buf_release(&off);
    return rc;
}

static int tables_ready(TablesObject *t) {
    if (!t->chan) {
        PyErr_SetString(PyExc_RuntimeError, "Tables is not initialised");
        return 0;
    }
    return 1;
}

/* ------------------------------------------------------------------------ */
/* Encoder                                                                  */

enum { ENC_OK = 0, ENC_BAD_INDEX, ENC_BAD_VALUE, ENC_NOMEM };

typedef struct {
    int code;
    Py_ssize_t pos;
    int64_t value;
} EncStatus;

/* Grow the backward-written buffer so that at least `need` free words lie
 * before *ptr; the words written so far keep their place at the end. */
static int enc_grow(uint32_t **buf, size_t *cap, uint32_t **ptr, size_t need) {
    size_t used = (size_t)(*buf + *cap - *ptr);
    size_t ncap = 2 * *cap + need + 16;
    uint32_t *nbuf = PyMem_RawMalloc(ncap * sizeof(uint32_t));
    if (!nbuf) return -1;
    memcpy(nbuf + ncap - used, *ptr, used * sizeof(uint32_t));
    PyMem_RawFree(*buf);
    *buf = nbuf;
    *cap = ncap;
    *ptr = nbuf + ncap - used;
    return 0;
}

/* An escaped value v (outside [0, mv)): its zig-zagged raw value and the number of
 * 4-bit bypass chunks that hold it. Returns 0 when v lies beyond the codable range. */
static inline int escape_chunks(int64_t v, int64_t mv, uint32_t *raw, uint32_t *nb) {
    if (UNLIKELY(v < -VALUE_SLACK || v > mv + VALUE_SLACK)) return 0;
    *raw = v < 0 ? (uint32_t)(-2 * v - 1) : (uint32_t)(2 * (v - mv));
    uint32_t n = 0;
    while (n < 8 && (*raw >> (n * BYPASS_BITS)) != 0) n++;
    *nb = n;
    return 1;
}

#if defined(__GNUC__) || defined(__clang__)
#define ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define ALWAYS_INLINE inline
#endif

/* An encoder: its state and its buffer, written backwards from the end (ptr: the first
 * word written), and the ideal code length of what it has coded. */
typedef struct {
    uint64_t x;
    uint32_t *buf;
    size_t cap;
    uint32_t *ptr;
    double total;
} EncLane;

static inline void enc_lane_init(EncLane *l, uint32_t *buf, size_t cap) {
    l->x = RANS_L;
    l->buf = buf;
    l->cap = cap;
    l->ptr = buf + cap;
    l->total = 0.0;
}

/* Code symbol i (value sym of channel ch); ENC_OK, ENC_BAD_VALUE or ENC_NOMEM.  With
 * want_bits its ideal code length (as bound_core counts it) is added to l->total.
 * Invariant: before coding symbol i at least i + 3 words are free (one per remaining main
 * symbol plus the flush), so only escapes check for room.  Always inlined, so the lane's
 * state stays in registers. */
static ALWAYS_INLINE int enc_symbol(EncLane *l, const Chan *ch, int32_t sym, Py_ssize_t i,
                                    uint32_t m, int xmax_shift, int want_bits) {
    uint64_t x = l->x;
    int64_t v = (int64_t)sym - ch->offset;
    const EncSym *e;
    if (LIKELY((uint64_t)v < (uint64_t)(uint32_t)ch->max_value)) {
        e = &ch->enc[v];
        if (want_bits) l->total += ch->bits[v];
    } else {
        int64_t mv = ch->max_value;
        uint32_t raw, nb;
        if (!escape_chunks(v, mv, &raw, &nb)) return ENC_BAD_VALUE;
        if ((size_t)(l->ptr - l->buf) < (size_t)i + 3 + 16) {
            if (enc_grow(&l->buf, &l->cap, &l->ptr, (size_t)i + 3 + 16) < 0) return ENC_NOMEM;
        }
        uint32_t *ptr = l->ptr;
        /* Chunks were pushed as: count run (15s then remainder), then raw
         * chunks low to high; code them in reverse. */
        for (int32_t j = (int32_t)nb - 1; j >= 0; j--) {
            uint32_t val = (raw >> ((uint32_t)j * BYPASS_BITS)) & BYPASS_MAX;
            if (x >= BYPASS_XMAX) {
                *--ptr = to_le32((uint32_t)x);
                x >>= 32;
            }
            x = (x << BYPASS_BITS) | val;
        }
        uint32_t rem = nb % BYPASS_MAX, runs = nb / BYPASS_MAX;
        for (uint32_t j = 0; j <= runs; j++) {
            uint32_t val = j == 0 ? rem : BYPASS_MAX;
            if (x >= BYPASS_XMAX) {
                *--ptr = to_le32((uint32_t)x);
                x >>= 32;
            }
            x = (x << BYPASS_BITS) | val;
        }
        l->ptr = ptr;
        e = &ch->enc[mv];
        if (want_bits)
            l->total += ch->bits[mv] + (double)(BYPASS_BITS * (nb + nb / BYPASS_MAX + 1));
    }
    uint64_t xmax = (uint64_t)(m - e->cmpl) << xmax_shift;
    if (x >= xmax) {
        *--l->ptr = to_le32((uint32_t)x);
        x >>= 32;
    }
    uint64_t q = mulhi64(x, e->rcp) >> e->shift;
    l->x = x + e->bias + q * e->cmpl;
    return ENC_OK;
}

/* The final state, two words, low first. */
static inline void enc_lane_flush(EncLane *l) {
    l->ptr -= 2;
    l->ptr[0] = to_le32((uint32_t)l->x);
    l->ptr[1] = to_le32((uint32_t)(l->x >> 32));
}

/* Code symbols n-1 .. 0 into the buffer, backwards.  On success *out points at the first
 * word of the stream (flush included), which ends at buf + cap.  The channel of each
 * symbol comes from idx, or, when idx is NULL, from the layout of a tile: rows of `tokens`
 * symbols, row r coded with channel r (no index array to read or check).  When bits is
 * not NULL the ideal code length of the symbols is added to *bits.  Always inlined, so
 * that each caller gets a loop with only the work it asked for. */
static ALWAYS_INLINE EncStatus encode_impl(const TablesObject *t, const int32_t *sym,
                                           const int32_t *idx, Py_ssize_t tokens, Py_ssize_t n,
                                           uint32_t **pbuf, size_t *pcap, uint32_t **out,
                                           double *bits) {
    EncStatus st = {ENC_OK, 0, 0};
    /* Tile layout: symbol i is in row c_run, whose remaining symbols below i are left. */
    uint32_t c_run = idx ? 0 : (uint32_t)((n - 1) / (tokens > 0 ? tokens : 1));
    Py_ssize_t left = idx ? 0 : (n - 1) - (Py_ssize_t)c_run * tokens;
    const Chan *chan = t->chan;
    const uint32_t nch = (uint32_t)t->channels;
    const uint32_t m = 1u << t->precision;
    const int xmax_shift = 63 - t->precision;
    EncLane l;
    enc_lane_init(&l, *pbuf, *pcap);

    for (Py_ssize_t i = n - 1; i >= 0; i--) {
        uint32_t c;
        if (idx) {
            c = (uint32_t)idx[i];
            if (UNLIKELY(c >= nch)) {
                st.code = ENC_BAD_INDEX;
                st.pos = i;
                st.value = (int32_t)c;
                break;
            }
        } else {
            c = c_run;
            if (left-- == 0) {
                c_run--;
                left = tokens - 1;
            }
        }
        int code = enc_symbol(&l, &chan[c], sym[i], i, m, xmax_shift, bits != NULL);
        if (UNLIKELY(code != ENC_OK)) {
            st.code = code;
            st.pos = i;
            st.value = sym[i];
            break;
        }
    }
    if (st.code == ENC_OK) enc_lane_flush(&l);
    *pbuf = l.buf;
    *pcap = l.cap;
    *out = l.ptr;
    if (bits) *bits += l.total;
    return st;
}

/* Two tiles at once, their symbols interleaved (as decode_pair).  0 when both are coded,
 * their bound added to *bits in tile order; else nonzero (code each alone to know why).
 * With latents (l0, l1 and med not NULL) the rounding error of each symbol is summed into
 * *sq in the same pass: the coder's chain of multiplies leaves time for it. */
static ALWAYS_INLINE int encode_pair_impl(const TablesObject *t, const int32_t *s0,
                                          const int32_t *s1, const float *l0, const float *l1,
                                          const float *med, Py_ssize_t rows, Py_ssize_t tokens,
                                          EncLane *a, EncLane *b, double *bits, double *sq) {
    const Chan *chan = t->chan;
    const uint32_t m = 1u << t->precision;
    const int xmax_shift = 63 - t->precision;
    double sq0 = 0.0, sq1 = 0.0;
    Py_ssize_t i = rows * tokens - 1;
    for (Py_ssize_t r = rows - 1; r >= 0; r--) {
        const Chan *ch = &chan[r];
        const float mr = med ? med[r] : 0.0f;
        for (Py_ssize_t j = 0; j < tokens; j++, i--) {
            int ca = enc_symbol(a, ch, s0[i], i, m, xmax_shift, 1);
            int cb = enc_symbol(b, ch, s1[i], i, m, xmax_shift, 1);
            if (UNLIKELY((ca | cb) != ENC_OK)) return 1;
            if (med) {
                float d0 = (l0[i] - mr) - (float)s0[i];
                float d1 = (l1[i] - mr) - (float)s1[i];
                sq0 += (double)d0 * d0;
                sq1 += (double)d1 * d1;
            }
        }
    }
    enc_lane_flush(a);
    enc_lane_flush(b);
    *bits += a->total;
    *bits += b->total;
    if (med) {
        *sq += sq0;
        *sq += sq1;
    }
    return 0;
}

static int encode_pair(const TablesObject *t, const int32_t *s0, const int32_t *s1,
                       const float *l0, const float *l1, const float *med, Py_ssize_t rows,
                       Py_ssize_t tokens, EncLane *a, EncLane *b, double *bits, double *sq) {
    if (med) return encode_pair_impl(t, s0, s1, l0, l1, med, rows, tokens, a, b, bits, sq);
    return encode_pair_impl(t, s0, s1, NULL, NULL, NULL, rows, tokens, a, b, bits, sq);
}

static EncStatus encode_core(const TablesObject *t, const int32_t *sym, const int32_t *idx,
                             Py_ssize_t n, uint32_t **pbuf, size_t *pcap, uint32_t **out) {
    return encode_impl(t, sym, idx, 0, n, pbuf, pcap, out, NULL);
}

/* One tile of `rows` x `tokens` symbols (row r: channel r), its ideal length added to *bits. */
static EncStatus encode_tile_core(const TablesObject *t, const int32_t *sym, Py_ssize_t tokens,
                                  Py_ssize_t n, uint32_t **pbuf, size_t *pcap, uint32_t **out,
                                  double *bits) {
    return encode_impl(t, sym, NULL, tokens, n, pbuf, pcap, out, bits);
}

static PyObject *raise_encode_error(const TablesObject *t, EncStatus st, const int32_t *idx) {
    if (st.code == ENC_NOMEM) return PyErr_NoMemory();
    if (st.code == ENC_BAD_INDEX) {
        PyErr_Format(PyExc_ValueError, "index %lld at position %zd is outside [0, %zd)",
                     (long long)st.value, st.pos, t->channels);
        return NULL;
    }
    const Chan *ch = &t->chan[idx[st.pos]];
    long long lo = (long long)ch->offset - VALUE_SLACK;
    long long hi = (long long)ch->offset + ch->max_value + VALUE_SLACK;
    PyErr_Format(PyExc_ValueError,
                 "symbol %lld at position %zd (index %d) is outside the codable range "
                 "[%lld, %lld]",
                 (long long)st.value, st.pos, (int)idx[st.pos], lo, hi);
    return NULL;
}

static PyObject *do_encode(TablesObject *t, PyObject *o_sym, PyObject *o_idx) {
    Buf sym = {0}, idx = {0};
    PyObject *res = NULL;
    uint32_t *buf = NULL;
    if (get_int32_buffer(o_sym, &sym, "symbols", 0) < 0) goto done;
    if (get_int32_buffer(o_idx, &idx, "indexes", 0) < 0) goto done;
    Py_ssize_t n = sym.view.len / 4;
    if (idx.view.len / 4 != n) {
        PyErr_Format(PyExc_ValueError, "symbols has %zd items but indexes has %zd", n,
                     idx.view.len / 4);
        goto done;
    }
    size_t cap = (size_t)n + 3 + 16;
    buf = PyMem_RawMalloc(cap * sizeof(uint32_t));
    if (!buf) {
        PyErr_NoMemory();
        goto done;
    }
    uint32_t *start = NULL;
    EncStatus st;
    Py_BEGIN_ALLOW_THREADS
    st = encode_core(t, (const int32_t *)sym.view.buf, (const int32_t *)idx.view.buf, n, &buf, &cap,
                     &start);
    Py_END_ALLOW_THREADS
    if (st.code != ENC_OK) {
        raise_encode_error(t, st, (const int32_t *)idx.view.buf);
        goto done;
    }
    res = PyBytes_FromStringAndSize((const char *)start,
                                    (Py_ssize_t)((size_t)(buf + cap - start) * sizeof(uint32_t)));
done:
    PyMem_RawFree(buf);
    buf_release(&sym);
    buf_release(&idx);
    return res;
}

/* ------------------------------------------------------------------------ */
/* Decoder                                                                  */

enum {
    DEC_OK = 0,
    DEC_BAD_INDEX,
    DEC_TRUNCATED,
    DEC_LONG_BYPASS,
    DEC_OVERFLOW,
    DEC_TRAILING,
    DEC_BAD_STATE
};

typedef struct {
    int code;
    Py_ssize_t pos;
    int64_t value;
} DecStatus;

/* A decoder: its state and its place in the stream's words. */
typedef struct {
    uint64_t x;
    size_t pos;
    size_t nwords;
    const unsigned char *data;
} Lane;

static inline void lane_init(Lane *l, const unsigned char *data, size_t nwords) {
    l->data = data;
    l->nwords = nwords;
    l->pos = 2;
    l->x = (uint64_t)load_le32(data) | ((uint64_t)load_le32(data + 4) << 32);
}

/* Decode one symbol of channel ch into *value; DEC_OK or the error (then *value is what
 * the error reports: the chunk count or the decoded value).  Always inlined, so the
 * lane's state stays in registers. */
static ALWAYS_INLINE int dec_symbol(Lane *l, const Chan *ch, int p, uint64_t mask, int bshift,
                                    int64_t *value) {
    uint64_t x = l->x;
    size_t pos = l->pos;
    const size_t nwords = l->nwords;
    const unsigned char *data = l->data;

#define READ_WORD()                                                    \
    do {                                                               \
        if (UNLIKELY(pos >= nwords)) return DEC_TRUNCATED;             \
        x = (x << 32) | load_le32(data + 4 * pos);                     \
        pos++;                                                         \
    } while (0)

#define GET_BITS(dst_)                                                 \
    do {                                                               \
        (dst_) = (uint32_t)(x & BYPASS_MAX);                           \
        x >>= BYPASS_BITS;                                             \
        if (x < RANS_L) READ_WORD();                                   \
    } while (0)

    uint32_t cf = (uint32_t)(x & mask);
    uint64_t e = ch->bucket[cf >> bshift];
    uint32_t s = (uint32_t)(e >> 32) & 0xffffu;
    uint32_t start = (uint32_t)e & 0xffffu;
    uint32_t freq = (uint32_t)(e >> 16) & 0xffffu;
    if (UNLIKELY(e >> 63)) {
        const uint32_t *cdf = ch->cdf;
        while (cdf[s + 1] <= cf) s++;
        start = cdf[s];
        freq = cdf[s + 1] - start;
    }
    x = (uint64_t)freq * (x >> p) + (cf - start);
    if (x < RANS_L) READ_WORD();
    int64_t v = (int64_t)s;
    if (UNLIKELY(v == ch->max_value)) {
        uint32_t val, nb;
        GET_BITS(val);
        nb = val;
        while (val == BYPASS_MAX) {
            if (nb > MAX_BYPASS_CHUNKS) break;
            GET_BITS(val);
            nb += val;
        }
        if (nb > MAX_BYPASS_CHUNKS) {
            *value = nb;
            return DEC_LONG_BYPASS;
        }
        uint32_t raw = 0;
        for (uint32_t j = 0; j < nb; j++) {
            GET_BITS(val);
            raw |= val << (j * BYPASS_BITS);
        }
        v = (int64_t)(raw >> 1);
        v = (raw & 1) ? -v - 1 : v + ch->max_value;
    }
#undef GET_BITS
#undef READ_WORD
    v += ch->offset;
    *value = v;
    if (UNLIKELY(v < INT32_MIN || v > INT32_MAX)) return DEC_OVERFLOW;
    l->x = x;
    l->pos = pos;
    return DEC_OK;
}

/* A valid stream is consumed exactly and ends in the initial state. */
static inline DecStatus lane_end(const Lane *l, Py_ssize_t n) {
    DecStatus st = {DEC_OK, n, 0};
    if (l->pos != l->nwords) {
        st.code = DEC_TRAILING;
        st.value = (int64_t)(l->nwords - l->pos);
    } else if (l->x != RANS_L) {
        st.code = DEC_BAD_STATE;
        st.value = (int64_t)l->x;
    }
    return st;
}

/* As encode_impl: channels from idx, or from the tile layout when idx is NULL. */
static ALWAYS_INLINE DecStatus decode_impl(const TablesObject *t, const unsigned char *data,
                                           size_t nwords, const int32_t *idx, Py_ssize_t tokens,
                                           int32_t *out, Py_ssize_t n) {
    DecStatus st = {DEC_OK, 0, 0};
    uint32_t c_run = 0;
    Py_ssize_t left = tokens;
    const Chan *chan = t->chan;
    const uint32_t nch = (uint32_t)t->channels;
    const int p = t->precision;
    const uint64_t mask = (1ull << p) - 1;
    const int bshift = t->bucket_shift;
    Lane l;
    lane_init(&l, data, nwords);
    for (Py_ssize_t i = 0; i < n; i++) {
        uint32_t c;
        if (idx) {
            c = (uint32_t)idx[i];
            if (UNLIKELY(c >= nch)) {
                st.code = DEC_BAD_INDEX;
                st.pos = i;
                st.value = (int32_t)c;
                return st;
            }
        } else {
            if (left == 0) {
                c_run++;
                left = tokens;
            }
            left--;
            c = c_run;
        }
        int64_t value = 0;
        int code = dec_symbol(&l, &chan[c], p, mask, bshift, &value);
        if (UNLIKELY(code != DEC_OK)) {
            st.code = code;
            st.pos = i;
            st.value = value;
            return st;
        }
        out[i] = (int32_t)value;
    }
    return lane_end(&l, n);
}

/* Two tiles at once, their symbols interleaved: each symbol's decode waits on the one
 * before it in its stream (a chain of loads and multiplies), so two independent chains
 * keep the core about twice as busy.  0 when both decode; else nonzero, with nothing to
 * say which or why (decode each alone for that: errors are rare). */
static int decode_pair(const TablesObject *t, const unsigned char *d0, size_t nw0,
                       const unsigned char *d1, size_t nw1, Py_ssize_t tokens, Py_ssize_t rows,
                       int32_t *out0, int32_t *out1) {
    const Chan *chan = t->chan;
    const int p = t->precision;
    const uint64_t mask = (1ull << p) - 1;
    const int bshift = t->bucket_shift;
    Lane a, b;
    lane_init(&a, d0, nw0);
    lane_init(&b, d1, nw1);
    Py_ssize_t i = 0;
    for (Py_ssize_t r = 0; r < rows; r++) {
        const Chan *ch = &chan[r];
        for (Py_ssize_t j = 0; j < tokens; j++, i++) {
            int64_t va, vb;
            int ca = dec_symbol(&a, ch, p, mask, bshift, &va);
            int cb = dec_symbol(&b, ch, p, mask, bshift, &vb);
            if (UNLIKELY((ca | cb) != DEC_OK)) return 1;
            out0[i] = (int32_t)va;
            out1[i] = (int32_t)vb;
        }
    }
    return lane_end(&a, i).code != DEC_OK || lane_end(&b, i).code != DEC_OK;
}

static DecStatus decode_core(const TablesObject *t, const unsigned char *data, size_t nwords,
                             const int32_t *idx, int32_t *out, Py_ssize_t n) {
    return decode_impl(t, data, nwords, idx, 0, out, n);
}

/* `where` prefixes the message (naming the stream of a batch; "" for one stream). */
static void raise_decode_error(const TablesObject *t, DecStatus st, Py_ssize_t n,
                               const char *where) {
    switch (st.code) {
    case DEC_BAD_INDEX:
        PyErr_Format(PyExc_ValueError, "%sindex %lld at position %zd is outside [0, %zd)", where,
                     (long long)st.value, st.pos, t->channels);
        break;
    case DEC_TRUNCATED:
        PyErr_Format(DecodeError,
                     "%struncated or corrupt bitstream: data ran out at symbol %zd of %zd", where,
                     st.pos, n);
        break;
    case DEC_LONG_BYPASS:
        PyErr_Format(DecodeError,
                     "%scorrupt bitstream: symbol %zd announces %lld raw bypass chunks (at most %d)",
                     where, st.pos, (long long)st.value, MAX_BYPASS_CHUNKS);
        break;
    case DEC_OVERFLOW:
        PyErr_Format(DecodeError, "%scorrupt bitstream: symbol %zd decodes to %lld, outside int32",
                     where, st.pos, (long long)st.value);
        break;
    case DEC_TRAILING:
        PyErr_Format(DecodeError,
                     "%scorrupt bitstream: %lld unread 32-bit words after the last of %zd symbols "
                     "(wrong symbol count or damaged data)",
                     where, (long long)st.value, n);
        break;
    default:
        PyErr_Format(DecodeError,
                     "%scorrupt bitstream: final coder state 0x%llx is not the initial state 0x%llx "
                     "(wrong symbol count, wrong tables or damaged data)",
                     where, (unsigned long long)st.value, (unsigned long long)RANS_L);
        break;
    }
}

static PyObject *do_decode(TablesObject *t, PyObject *o_data, PyObject *o_idx, PyObject *o_out) {
    Py_buffer data;
    Buf idx = {0}, out = {0};
    PyObject *res = NULL;
    if (PyObject_GetBuffer(o_data, &data, PyBUF_SIMPLE) < 0) return NULL;
    if (get_int32_buffer(o_idx, &idx, "indexes", 0) < 0) goto done;
    if (get_int32_buffer(o_out, &out, "out", 1) < 0) goto done;
    Py_ssize_t n = idx.view.len / 4;
    if (out.view.len / 4 != n) {
        PyErr_Format(PyExc_ValueError, "out has %zd items but indexes has %zd", out.view.len / 4, n);
        goto done;
    }
    if (data.len < 8 || data.len % 4 != 0) {
        PyErr_Format(DecodeError,
                     "corrupt bitstream: %zd bytes, expected a multiple of 4 and at least 8",
                     data.len);
        goto done;
    }
    DecStatus st;
    Py_BEGIN_ALLOW_THREADS
    st = decode_core(t, (const unsigned char *)data.buf, (size_t)data.len / 4,
                     (const int32_t *)idx.view.buf, (int32_t *)out.view.buf, n);
    Py_END_ALLOW_THREADS
    if (st.code != DEC_OK) {
        raise_decode_error(t, st, n, "");
        goto done;
    }
    res = Py_NewRef(Py_None);
done:
    PyBuffer_Release(&data);
    buf_release(&idx);
    buf_release(&out);
    return res;
}

/* ------------------------------------------------------------------------ */
/* Entropy bound                                                            */

/* Sum of the ideal code lengths of the symbols, in bits: -log2(freq / M) of each
 * value, and for an escaped value the escape's cost plus the bypass chunks encode_core
 * writes for it (the raw chunks, then the count in runs of BYPASS_MAX). The same
 * checks as encode_core; nothing is written. */
static EncStatus bound_core(const TablesObject *t, const int32_t *sym, const int32_t *idx,
                            Py_ssize_t n, double *out) {
    EncStatus st = {ENC_OK, 0, 0};
    const Chan *chan = t->chan;
    const uint32_t nch = (uint32_t)t->channels;
    double total = 0.0;
    for (Py_ssize_t i = 0; i < n; i++) {
        uint32_t c = (uint32_t)idx[i];
        if (UNLIKELY(c >= nch)) {
            st.code = ENC_BAD_INDEX;
            st.pos = i;
            st.value = (int32_t)c;
            break;
        }
        const Chan *ch = &chan[c];
        int64_t v = (int64_t)sym[i] - ch->offset;
        if (LIKELY((uint64_t)v < (uint64_t)(uint32_t)ch->max_value)) {
            total += ch->bits[v];
            continue;
        }
        int64_t mv = ch->max_value;
        uint32_t raw, nb;
        if (!escape_chunks(v, mv, &raw, &nb)) {
            st.code = ENC_BAD_VALUE;
            st.pos = i;
            st.value = sym[i];
            break;
        }
        total += ch->bits[mv] + (double)(BYPASS_BITS * (nb + nb / BYPASS_MAX + 1));
    }
    *out = total;
    return st;
}

static PyObject *do_bound(TablesObject *t, PyObject *o_sym, PyObject *o_idx) {
    Buf sym = {0}, idx = {0};
    PyObject *res = NULL;
    if (get_int32_buffer(o_sym, &sym, "symbols", 0) < 0) goto done;
    if (get_int32_buffer(o_idx, &idx, "indexes", 0) < 0) goto done;
    Py_ssize_t n = sym.view.len / 4;
    if (idx.view.len / 4 != n) {
        PyErr_Format(PyExc_ValueError, "symbols has %zd items but indexes has %zd", n,
                     idx.view.len / 4);
        goto done;
    }
    double bits = 0.0;
    EncStatus st;
    Py_BEGIN_ALLOW_THREADS
    st = bound_core(t, (const int32_t *)sym.view.buf, (const int32_t *)idx.view.buf, n, &bits);
    Py_END_ALLOW_THREADS
    if (st.code != ENC_OK) {
        raise_encode_error(t, st, (const int32_t *)idx.view.buf);
        goto done;
    }
    res = PyFloat_FromDouble(bits);
done:
    buf_release(&sym);
    buf_release(&idx);
    return res;
}

/* ------------------------------------------------------------------------ */
/* Batches of tiles                                                         */

/* A tile is `rows` x `tokens` symbols, row r coded with channel r: the layout of a
 * (B, C, T) batch, and of the first rows of a categorical one.  One call codes the whole
 * batch, so nothing per tile or per symbol runs in Python. */

static int tile_geometry(const TablesObject *t, Py_ssize_t rows, Py_ssize_t tokens,
                         Py_ssize_t items, Py_ssize_t *tiles) {
    if (rows < 1 || rows > t->channels) {
        PyErr_Format(PyExc_ValueError, "rows must be in [1, %zd], got %zd", t->channels, rows);
        return -1;
    }
    if (tokens < 1 || tokens > PY_SSIZE_T_MAX / 8 / rows) {
        PyErr_Format(PyExc_ValueError, "tokens must be a positive size, got %zd", tokens);
        return -1;
    }
    Py_ssize_t per = rows * tokens;
    if (tiles) {
        if (items < per || items % per != 0) {
            PyErr_Format(PyExc_ValueError,
                         "symbols has %zd items, not a whole number (>= 1) of %zd x %zd tiles",
                         items, rows, tokens);
            return -1;
        }
        *tiles = items / per;
    } else if (items != per) {
        PyErr_Format(PyExc_ValueError, "expected %zd items, got %zd", per, items);
        return -1;
    }
    return 0;
}

/* Acquire a C-contiguous buffer of native float32 items. */
static int get_float32_buffer(PyObject *obj, Buf *b, const char *name) {
    if (PyObject_GetBuffer(obj, &b->view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0) {
        PyErr_Clear();
        PyErr_Format(PyExc_TypeError, "%s must be a C-contiguous float32 buffer, got %.100s",
                     name, Py_TYPE(obj)->tp_name);
        return -1;
    }
    b->held = 1;
    const char *f = b->view.format ? b->view.format : "B";
    if (*f == '@' || *f == '=' || (*f == '<' && !HOST_BIG_ENDIAN) || (*f == '>' && HOST_BIG_ENDIAN))
        f++;
    if (b->view.itemsize != 4 || f[0] != 'f' || f[1] != '\0') {
        PyErr_Format(PyExc_TypeError, "%s must hold native float32 items, got format '%s'", name,
                     b->view.format ? b->view.format : "B");
        buf_release(b);
        return -1;
    }
    return 0;
}

/* Sum over a tile of ((latent - median[row]) - symbol)^2, each difference rounded to
 * float32 as numpy computes it.  Eight float32 partial sums per row (a shape the compiler
 * vectorizes), the rows summed in double: as accurate as numpy's float32 dot product. */
static double sq_err_core(const int32_t *sym, const float *lat, const float *med, Py_ssize_t rows,
                          Py_ssize_t tokens) {
    double total = 0.0;
    for (Py_ssize_t r = 0; r < rows; r++) {
        const float m = med[r];
        const int32_t *s = sym + r * tokens;
        const float *l = lat + r * tokens;
        float acc[8] = {0};
        Py_ssize_t j = 0;
        for (; j + 8 <= tokens; j += 8) {
            for (int k = 0; k < 8; k++) {
                float d = (l[j + k] - m) - (float)s[j + k];
                acc[k] += d * d;
            }
        }
        for (; j < tokens; j++) {
            float d = (l[j] - m) - (float)s[j];
            acc[j & 7] += d * d;
        }
        total += (double)(((acc[0] + acc[1]) + (acc[2] + acc[3])) +
                          ((acc[4] + acc[5]) + (acc[6] + acc[7])));
    }
    return total;
}

static int put_stream(PyObject *list, Py_ssize_t k, const uint32_t *ptr, const uint32_t *end) {
    PyObject *b = PyBytes_FromStringAndSize((const char *)ptr,
                                            (Py_ssize_t)((size_t)(end - ptr) * sizeof(uint32_t)));
    if (!b) return -1;
    PyList_SET_ITEM(list, k, b);
    return 0;
}

static void raise_tile_error(const TablesObject *t, EncStatus st, Py_ssize_t k, Py_ssize_t tokens) {
    if (st.code == ENC_NOMEM) {
        PyErr_NoMemory();
        return;
    }
    const Chan *ch = &t->chan[st.pos / tokens];
    PyErr_Format(PyExc_ValueError,
                 "tile %zd: symbol %lld at position %zd (row %zd) is outside the codable range "
                 "[%lld, %lld]",
                 k, (long long)st.value, st.pos, st.pos / tokens,
                 (long long)ch->offset - VALUE_SLACK,
                 (long long)ch->offset + ch->max_value + VALUE_SLACK);
}

/* What encode_tiles works with: the tiles, two lane buffers and the running sums. */
typedef struct {
    const TablesObject *t;
    const int32_t *sym;
    const float *lat; /* NULL: no rounding error to sum */
    const float *med;
    Py_ssize_t rows, tokens, n;
    uint32_t *buf[2];
    size_t cap[2];
    double bits, sq;
} TileJob;

/* Code tiles k and k + 1 together into list; 1 when one of them is bad (nothing added). */
static int encode_two(TileJob *j, Py_ssize_t k, PyObject *list) {
    const int32_t *s0 = j->sym + k * j->n;
    EncLane a, b;
    enc_lane_init(&a, j->buf[0], j->cap[0]);
    enc_lane_init(&b, j->buf[1], j->cap[1]);
    const float *l0 = j->lat ? j->lat + k * j->n : NULL;
    double bits = 0.0, sq = 0.0;
    int bad;
    Py_BEGIN_ALLOW_THREADS
    bad = encode_pair(j->t, s0, s0 + j->n, l0, l0 ? l0 + j->n : NULL, j->med, j->rows,
                      j->tokens, &a, &b, &bits, &sq);
    Py_END_ALLOW_THREADS
    j->buf[0] = a.buf, j->cap[0] = a.cap, j->buf[1] = b.buf, j->cap[1] = b.cap;
    if (bad) return 1;
    j->bits += bits;
    j->sq += sq;
    if (put_stream(list, k, a.ptr, a.buf + a.cap) < 0) return -1;
    return put_stream(list, k + 1, b.ptr, b.buf + b.cap);
}

/* Code tile k alone into list; raise naming it if it is bad. */
static int encode_one(TileJob *j, Py_ssize_t k, PyObject *list) {
    const int32_t *s = j->sym + k * j->n;
    uint32_t *start = NULL;
    EncStatus st;
    Py_BEGIN_ALLOW_THREADS
    st = encode_tile_core(j->t, s, j->tokens, j->n, &j->buf[0], &j->cap[0], &start, &j->bits);
    if (st.code == ENC_OK && j->lat)
        j->sq += sq_err_core(s, j->lat + k * j->n, j->med, j->rows, j->tokens);
    Py_END_ALLOW_THREADS
    if (st.code != ENC_OK) {
        raise_tile_error(j->t, st, k, j->tokens);
        return -1;
    }
    return put_stream(list, k, start, j->buf[0] + j->cap[0]);
}

static PyObject *tables_encode_tiles(TablesObject *t, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"symbols", "rows", "tokens", "latent", "medians", NULL};
    PyObject *o_sym, *o_lat = Py_None, *o_med = Py_None;
    Py_ssize_t rows, tokens, tiles = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "Onn|OO:encode_tiles", kwlist, &o_sym, &rows,
                                     &tokens, &o_lat, &o_med))
        return NULL;
    if (!tables_ready(t)) return NULL;
    Buf sym = {0}, lat = {0}, med = {0};
    PyObject *list = NULL, *res = NULL;
    TileJob j = {0};
    if (get_int32_buffer(o_sym, &sym, "symbols", 0) < 0) goto done;
    if (tile_geometry(t, rows, tokens, sym.view.len / 4, &tiles) < 0) goto done;
    if ((o_lat == Py_None) != (o_med == Py_None)) {
        PyErr_SetString(PyExc_ValueError, "latent and medians go together");
        goto done;
    }
    if (o_lat != Py_None) {
        if (get_float32_buffer(o_lat, &lat, "latent") < 0) goto done;
        if (get_float32_buffer(o_med, &med, "medians") < 0) goto done;
        if (lat.view.len != sym.view.len || med.view.len / 4 < rows) {
            PyErr_Format(PyExc_ValueError,
                         "latent has %zd items and medians %zd, expected %zd and >= %zd",
                         lat.view.len / 4, med.view.len / 4, sym.view.len / 4, rows);
            goto done;
        }
    }
    j.t = t;
    j.sym = (const int32_t *)sym.view.buf;
    j.lat = lat.held ? (const float *)lat.view.buf : NULL;
    j.med = med.held ? (const float *)med.view.buf : NULL;
    j.rows = rows, j.tokens = tokens, j.n = rows * tokens;
    for (int b = 0; b < 2; b++) {
        j.cap[b] = (size_t)j.n + 3 + 16;
        j.buf[b] = PyMem_RawMalloc(j.cap[b] * sizeof(uint32_t));
    }
    list = PyList_New(tiles);
    if (!j.buf[0] || !j.buf[1] || !list) {
        if (list) PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t k = 0; k < tiles;) {
        /* A bad pair is coded again one tile at a time, which names the first bad tile. */
        int rc = k + 1 < tiles ? encode_two(&j, k, list) : 1;
        if (rc < 0) goto done;
        if (rc == 0) {
            k += 2;
        } else {
            if (encode_one(&j, k, list) < 0) goto done;
            k += 1;
        }
    }
    res = Py_BuildValue("(Odd)", list, j.bits, j.sq);
done:
    Py_XDECREF(list);
    PyMem_RawFree(j.buf[0]);
    PyMem_RawFree(j.buf[1]);
    buf_release(&sym);
    buf_release(&lat);
    buf_release(&med);
    return res;
}

/* Stream k of a batch as a buffer of a length a stream can have; else raise, naming it. */
static int stream_buffer(PyObject *item, Py_ssize_t k, Py_buffer *data) {
    if (PyObject_GetBuffer(item, data, PyBUF_SIMPLE) < 0) {
        PyErr_Clear();
        PyErr_Format(PyExc_TypeError,
                     "stream %zd: bitstream must be a contiguous bytes-like object, got %.100s", k,
                     Py_TYPE(item)->tp_name);
        return -1;
    }
    if (data->len < 8 || data->len % 4 != 0) {
        PyErr_Format(DecodeError,
                     "stream %zd: corrupt bitstream: %zd bytes, expected a multiple of 4 and at "
                     "least 8",
                     k, data->len);
        PyBuffer_Release(data);
        return -1;
    }
    return 0;
}

/* Decode stream k alone; raise DecodeError naming it if it is bad. */
static int decode_one(const TablesObject *t, const Py_buffer *data, Py_ssize_t k,
                      Py_ssize_t tokens, int32_t *out, Py_ssize_t n) {
    DecStatus st;
    Py_BEGIN_ALLOW_THREADS
    st = decode_impl(t, (const unsigned char *)data->buf, (size_t)data->len / 4, NULL, tokens,
                     out, n);
    Py_END_ALLOW_THREADS
    if (st.code == DEC_OK) return 0;
    char where[48];
    PyOS_snprintf(where, sizeof where, "stream %zd: ", k);
    raise_decode_error(t, st, n, where);
    return -1;
}

/* Decode tiles k and k + 1 together; on any error decode them one by one, which raises for
 * the first bad one exactly as decoding stream by stream would. */
static int decode_two(const TablesObject *t, const Py_buffer *d0, const Py_buffer *d1,
                      Py_ssize_t k, Py_ssize_t rows, Py_ssize_t tokens, int32_t *out) {
    Py_ssize_t n = rows * tokens;
    int bad;
    Py_BEGIN_ALLOW_THREADS
    bad = decode_pair(t, (const unsigned char *)d0->buf, (size_t)d0->len / 4,
                      (const unsigned char *)d1->buf, (size_t)d1->len / 4, tokens, rows,
                      out + k * n, out + (k + 1) * n);
    Py_END_ALLOW_THREADS
    if (!bad) return 0;
    if (decode_one(t, d0, k, tokens, out + k * n, n) < 0) return -1;
    return decode_one(t, d1, k + 1, tokens, out + (k + 1) * n, n);
}

static PyObject *tables_decode_tiles(TablesObject *t, PyObject *args) {
    PyObject *o_streams, *o_out;
    Py_ssize_t rows, tokens;
    if (!PyArg_ParseTuple(args, "OnnO:decode_tiles", &o_streams, &rows, &tokens, &o_out))
        return NULL;
    if (!tables_ready(t)) return NULL;
    PyObject *seq = PySequence_Fast(o_streams, "streams must be a sequence of bitstreams");
    if (!seq) return NULL;
    Buf out = {0};
    PyObject *res = NULL;
    Py_ssize_t count = PySequence_Fast_GET_SIZE(seq), tiles = 0;
    if (get_int32_buffer(o_out, &out, "out", 1) < 0) goto done;
    if (count > 0 && tile_geometry(t, rows, tokens, out.view.len / 4, &tiles) < 0) goto done;
    if (tiles != count) {
        PyErr_Format(PyExc_ValueError, "out holds %zd tiles of %zd x %zd but there are %zd streams",
                     tiles, rows, tokens, count);
        goto done;
    }
    Py_ssize_t n = rows * tokens;
    int32_t *dst = (int32_t *)out.view.buf;
    for (Py_ssize_t k = 0; k < tiles;) {
        Py_buffer d0, d1;
        if (stream_buffer(PySequence_Fast_GET_ITEM(seq, k), k, &d0) < 0) goto done;
        int rc;
        if (k + 1 < tiles && stream_buffer(PySequence_Fast_GET_ITEM(seq, k + 1), k + 1, &d1) == 0) {
            rc = decode_two(t, &d0, &d1, k, rows, tokens, dst);
            PyBuffer_Release(&d1);
            k += 2;
        } else {
            PyErr_Clear(); /* a bad stream k + 1 is reported in its turn, after stream k */
            rc = decode_one(t, &d0, k, tokens, dst + k * n, n);
            k += 1;
        }
        PyBuffer_Release(&d0);
        if (rc < 0) goto done;
    }
    res = Py_NewRef(Py_None);
done:
    Py_DECREF(seq);
    buf_release(&out);
    return res;
}

/* ------------------------------------------------------------------------ */
/* Python-facing methods                                                    */

static PyObject *tables_encode(TablesObject *t, PyObject *args) {
    PyObject *o_sym, *o_idx;
    if (!PyArg_ParseTuple(args, "OO:encode", &o_sym, &o_idx)) return NULL;
    if (!tables_ready(t)) return NULL;
    return do_encode(t, o_sym, o_idx);
}

static PyObject *tables_bound_bits(TablesObject *t, PyObject *args) {
    PyObject *o_sym, *o_idx;
    if (!PyArg_ParseTuple(args, "OO:bound_bits", &o_sym, &o_idx)) return NULL;
    if (!tables_ready(t)) return NULL;
    return do_bound(t, o_sym, o_idx);
}

static PyObject *tables_decode(TablesObject *t, PyObject *args) {
    PyObject *o_data, *o_idx, *o_out;
    if (!PyArg_ParseTuple(args, "OOO:decode", &o_data, &o_idx, &o_out)) return NULL;
    if (!tables_ready(t)) return NULL;
    return do_decode(t, o_data, o_idx, o_out);
}

static PyObject *tables_get_channels(TablesObject *t, void *closure) {
    (void)closure;
    return PyLong_FromSsize_t(t->channels);
}

static PyObject *tables_get_max_length(TablesObject *t, void *closure) {
    (void)closure;
    return PyLong_FromSsize_t(t->max_length);
}

static PyObject *tables_get_precision(TablesObject *t, void *closure) {
    (void)closure;
    return PyLong_FromLong(t->precision);
}

static PyMethodDef tables_methods[] = {
    {"encode", (PyCFunction)tables_encode, METH_VARARGS,
     "encode(symbols, indexes) -> bytes\n\n"
     "Code int32 symbols, each with the CDF row given by the int32 index beside it;\n"
     "the bytes are those of CompressAI's RansEncoder.encode_with_indexes."},
    {"bound_bits", (PyCFunction)tables_bound_bits, METH_VARARGS,
     "bound_bits(symbols, indexes) -> float\n\n"
     "Ideal code length in bits of what encode(symbols, indexes) codes: -log2 of each\n"
     "value's probability, escapes with their bypass chunks. Same checks as encode."},
    {"encode_tiles", (PyCFunction)(void (*)(void))tables_encode_tiles,
     METH_VARARGS | METH_KEYWORDS,
     "encode_tiles(symbols, rows, tokens, latent=None, medians=None)\n"
     "    -> (list[bytes], bound_bits, sq_err)\n\n"
     "Code each rows x tokens tile of the int32 symbols (row r with channel r) into its\n"
     "own stream, the bytes encode() writes. bound_bits is bound_bits() of all of them;\n"
     "sq_err, with float32 latent (as symbols) and medians (per row), the sum of\n"
     "((latent - median) - symbol)^2, else 0.0. ValueError names the first bad tile."},
    {"decode_tiles", (PyCFunction)tables_decode_tiles, METH_VARARGS,
     "decode_tiles(streams, rows, tokens, out) -> None\n\n"
     "Decode each stream as a rows x tokens tile into the writable int32 buffer out\n"
     "(len(streams) tiles). DecodeError, or TypeError for a stream that is not\n"
     "bytes-like, names the first bad stream."},
    {"decode", (PyCFunction)tables_decode, METH_VARARGS,
     "decode(data, indexes, out) -> None\n\n"
     "Decode len(indexes) symbols from data into the writable int32 buffer out.\n"
     "Raises DecodeError on truncated, damaged or not fully consumed data."},
    {NULL, NULL, 0, NULL}};

static PyGetSetDef tables_getset[] = {
    {"channels", (getter)tables_get_channels, NULL, "number of CDF rows", NULL},
    {"max_length", (getter)tables_get_max_length, NULL, "row length of the CDF matrix", NULL},
    {"precision", (getter)tables_get_precision, NULL, "probability precision in bits", NULL},
    {NULL, NULL, NULL, NULL, NULL}};

static PyTypeObject TablesType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "nec_serve._rans.Tables",
    .tp_basicsize = sizeof(TablesObject),
    .tp_dealloc = (destructor)tables_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Tables(cdfs, cdf_lengths, offsets, max_length, precision=16)\n\n"
              "Validated quantized CDFs with precomputed encoder reciprocals and decoder\n"
              "lookup tables. cdfs: int32 (C * max_length) row-major; cdf_lengths, offsets:\n"
              "int32 (C,). Immutable; safe to share between threads.",
    .tp_methods = tables_methods,
    .tp_getset = tables_getset,
    .tp_init = (initproc)tables_init,
    .tp_new = PyType_GenericNew,
};

static TablesObject *make_tables(PyObject *const *args) {
    PyObject *targs = Py_BuildValue("(OOOOO)", args[0], args[1], args[2], args[3], args[4]);
    if (!targs) return NULL;
    PyObject *t = PyObject_CallObject((PyObject *)&TablesType, targs);
    Py_DECREF(targs);
    return (TablesObject *)t;
}

static PyObject *mod_encode(PyObject *mod, PyObject *args) {
    (void)mod;
    PyObject *o[7];
    if (!PyArg_ParseTuple(args, "OOOOOOO:encode", &o[0], &o[1], &o[2], &o[3], &o[4], &o[5], &o[6]))
        return NULL;
    TablesObject *t = make_tables(o + 2);
    if (!t) return NULL;
    PyObject *res = do_encode(t, o[0], o[1]);
    Py_DECREF(t);
    return res;
}

static PyObject *mod_decode(PyObject *mod, PyObject *args) {
    (void)mod;
    PyObject *o[8];
    if (!PyArg_ParseTuple(args, "OOOOOOOO:decode", &o[0], &o[1], &o[2], &o[3], &o[4], &o[5], &o[6],
                          &o[7]))
        return NULL;
    TablesObject *t = make_tables(o + 2);
    if (!t) return NULL;
    PyObject *res = do_decode(t, o[0], o[1], o[7]);
    Py_DECREF(t);
    return res;
}

static PyMethodDef module_methods[] = {
    {"encode", mod_encode, METH_VARARGS,
     "encode(symbols, indexes, cdfs, cdf_lengths, offsets, max_length, precision) -> bytes\n\n"
     "One-shot form of Tables(...).encode(symbols, indexes)."},
    {"decode", mod_decode, METH_VARARGS,
     "decode(data, indexes, cdfs, cdf_lengths, offsets, max_length, precision, out) -> None\n\n"
     "One-shot form of Tables(...).decode(data, indexes, out)."},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef rans_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "nec_serve._rans",
    .m_doc = "Byte-exact, bounds-checked re-implementation of CompressAI 1.2.8's rANS coder.",
    .m_size = -1,
    .m_methods = module_methods,
};

PyMODINIT_FUNC PyInit__rans(void) {
    if (PyType_Ready(&TablesType) < 0) return NULL;
    PyObject *m = PyModule_Create(&rans_module);
    if (!m) return NULL;
    Py_INCREF(&TablesType);
    if (PyModule_AddObject(m, "Tables", (PyObject *)&TablesType) < 0) {
        Py_DECREF(&TablesType);
        Py_DECREF(m);
        return NULL;
    }
    DecodeError = PyErr_NewExceptionWithDoc(
        "nec_serve._rans.DecodeError",
        "A bitstream that is truncated, damaged or does not match the symbol count.",
        PyExc_ValueError, NULL);
    if (!DecodeError || PyModule_AddObject(m, "DecodeError", DecodeError) < 0) {
        Py_XDECREF(DecodeError);
        Py_DECREF(m);
        return NULL;
    }
    Py_INCREF(DecodeError);
    if (PyModule_AddIntConstant(m, "RAW_VALUE_SLACK", (long)VALUE_SLACK) < 0 ||
        PyModule_AddIntConstant(m, "MAX_BYPASS_CHUNKS", MAX_BYPASS_CHUNKS) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
