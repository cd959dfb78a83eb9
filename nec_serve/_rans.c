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

/* Code symbols n-1 .. 0 into the buffer, backwards.  On success *out points at
 * the first word of the stream (flush included), which ends at buf + cap. */
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

static EncStatus encode_core(const TablesObject *t, const int32_t *sym, const int32_t *idx,
                             Py_ssize_t n, uint32_t **pbuf, size_t *pcap, uint32_t **out) {
    EncStatus st = {ENC_OK, 0, 0};
    const Chan *chan = t->chan;
    const uint32_t nch = (uint32_t)t->channels;
    const int p = t->precision;
    const uint32_t m = 1u << p;
    const int xmax_shift = 63 - p;
    uint32_t *buf = *pbuf;
    size_t cap = *pcap;
    /* Invariant: before coding symbol i at least i + 3 words are free (one per
     * remaining main symbol plus the flush), so main symbols need no check. */
    uint32_t *ptr = buf + cap;
    uint64_t x = RANS_L;

    for (Py_ssize_t i = n - 1; i >= 0; i--) {
        uint32_t c = (uint32_t)idx[i];
        if (UNLIKELY(c >= nch)) {
            st.code = ENC_BAD_INDEX;
            st.pos = i;
            st.value = (int32_t)c;
            break;
        }
        const Chan *ch = &chan[c];
        int64_t v = (int64_t)sym[i] - ch->offset;
        const EncSym *e;
        if (LIKELY((uint64_t)v < (uint64_t)(uint32_t)ch->max_value)) {
            e = &ch->enc[v];
        } else {
            int64_t mv = ch->max_value;
            uint32_t raw, nb;
            if (!escape_chunks(v, mv, &raw, &nb)) {
                st.code = ENC_BAD_VALUE;
                st.pos = i;
                st.value = sym[i];
                break;
            }
            if ((size_t)(ptr - buf) < (size_t)i + 3 + 16) {
                if (enc_grow(&buf, &cap, &ptr, (size_t)i + 3 + 16) < 0) {
                    st.code = ENC_NOMEM;
                    break;
                }
            }
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
            e = &ch->enc[mv];
        }
        uint64_t xmax = (uint64_t)(m - e->cmpl) << xmax_shift;
        if (x >= xmax) {
            *--ptr = to_le32((uint32_t)x);
            x >>= 32;
        }
        uint64_t q = mulhi64(x, e->rcp) >> e->shift;
        x = x + e->bias + q * e->cmpl;
    }
    if (st.code == ENC_OK) {
        ptr -= 2;
        ptr[0] = to_le32((uint32_t)x);
        ptr[1] = to_le32((uint32_t)(x >> 32));
    }
    *pbuf = buf;
    *pcap = cap;
    *out = ptr;
    return st;
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

static DecStatus decode_core(const TablesObject *t, const unsigned char *data, size_t nwords,
                             const int32_t *idx, int32_t *out, Py_ssize_t n) {
    DecStatus st = {DEC_OK, 0, 0};
    const Chan *chan = t->chan;
    const uint32_t nch = (uint32_t)t->channels;
    const int p = t->precision;
    const uint64_t mask = (1ull << p) - 1;
    const int bshift = t->bucket_shift;
    size_t pos = 2;
    uint64_t x = (uint64_t)load_le32(data) | ((uint64_t)load_le32(data + 4) << 32);

#define READ_WORD(i_)                                                  \
    do {                                                               \
        if (UNLIKELY(pos >= nwords)) {                                 \
            st.code = DEC_TRUNCATED;                                   \
            st.pos = (i_);                                             \
            return st;                                                 \
        }                                                              \
        x = (x << 32) | load_le32(data + 4 * pos);                     \
        pos++;                                                         \
    } while (0)

#define GET_BITS(dst_, i_)                                             \
    do {                                                               \
        (dst_) = (uint32_t)(x & BYPASS_MAX);                           \
        x >>= BYPASS_BITS;                                             \
        if (x < RANS_L) READ_WORD(i_);                                 \
    } while (0)

    for (Py_ssize_t i = 0; i < n; i++) {
        uint32_t c = (uint32_t)idx[i];
        if (UNLIKELY(c >= nch)) {
            st.code = DEC_BAD_INDEX;
            st.pos = i;
            st.value = (int32_t)c;
            return st;
        }
        const Chan *ch = &chan[c];
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
        if (x < RANS_L) READ_WORD(i);
        int64_t value = (int64_t)s;
        if (UNLIKELY(value == ch->max_value)) {
            uint32_t val, nb;
            GET_BITS(val, i);
            nb = val;
            while (val == BYPASS_MAX) {
                if (nb > MAX_BYPASS_CHUNKS) break;
                GET_BITS(val, i);
                nb += val;
            }
            if (nb > MAX_BYPASS_CHUNKS) {
                st.code = DEC_LONG_BYPASS;
                st.pos = i;
                st.value = nb;
                return st;
            }
            uint32_t raw = 0;
            for (uint32_t j = 0; j < nb; j++) {
                GET_BITS(val, i);
                raw |= val << (j * BYPASS_BITS);
            }
            value = (int64_t)(raw >> 1);
            value = (raw & 1) ? -value - 1 : value + ch->max_value;
        }
        value += ch->offset;
        if (UNLIKELY(value < INT32_MIN || value > INT32_MAX)) {
            st.code = DEC_OVERFLOW;
            st.pos = i;
            st.value = value;
            return st;
        }
        out[i] = (int32_t)value;
    }
#undef GET_BITS
#undef READ_WORD
    if (pos != nwords) {
        st.code = DEC_TRAILING;
        st.pos = n;
        st.value = (int64_t)(nwords - pos);
    } else if (x != RANS_L) {
        st.code = DEC_BAD_STATE;
        st.pos = n;
        st.value = (int64_t)x;
    }
    return st;
}

static void raise_decode_error(const TablesObject *t, DecStatus st, Py_ssize_t n) {
    switch (st.code) {
    case DEC_BAD_INDEX:
        PyErr_Format(PyExc_ValueError, "index %lld at position %zd is outside [0, %zd)",
                     (long long)st.value, st.pos, t->channels);
        break;
    case DEC_TRUNCATED:
        PyErr_Format(DecodeError,
                     "truncated or corrupt bitstream: data ran out at symbol %zd of %zd", st.pos, n);
        break;
    case DEC_LONG_BYPASS:
        PyErr_Format(DecodeError,
                     "corrupt bitstream: symbol %zd announces %lld raw bypass chunks (at most %d)",
                     st.pos, (long long)st.value, MAX_BYPASS_CHUNKS);
        break;
    case DEC_OVERFLOW:
        PyErr_Format(DecodeError, "corrupt bitstream: symbol %zd decodes to %lld, outside int32",
                     st.pos, (long long)st.value);
        break;
    case DEC_TRAILING:
        PyErr_Format(DecodeError,
                     "corrupt bitstream: %lld unread 32-bit words after the last of %zd symbols "
                     "(wrong symbol count or damaged data)",
                     (long long)st.value, n);
        break;
    default:
        PyErr_Format(DecodeError,
                     "corrupt bitstream: final coder state 0x%llx is not the initial state 0x%llx "
                     "(wrong symbol count, wrong tables or damaged data)",
                     (unsigned long long)st.value, (unsigned long long)RANS_L);
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
        raise_decode_error(t, st, n);
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
