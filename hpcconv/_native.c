/* hpcconv._native: per-entry and per-byte work of the conversion, in C (tar headers, the x86 scan).
 *
 * Optional: setup.py builds it when a C compiler is there; without it hpcconv runs the pure-Python
 * code in tarread.py / entries.py / rewrite/x86scan.py, which stays the reference
 * (tests/test_native.py and tests/test_rewrite_x86scan.py compare the two). HPCCONV_NO_NATIVE=1
 * makes hpcconv ignore the module (speedups.py loads it).
 *
 *   fields(block) -> (typeflag, size, name, mode, uid, gid, mtime, linkname, devmajor, devminor) | None
 *       One 512-byte tar header block whose checksum and numeric fields are in the plain form
 *       (octal digits after optional spaces, ended by NULs/spaces): the values tarread's Python
 *       parser gives for it. Anything else (base-256 numbers, a signed-char checksum, a bad
 *       checksum, odd digits) gives None, and the Python parser decides (and names the error).
 *
 *   ustar(name, mode, uid, gid, size, mtime, typeflag, linkname, uname, gname, dev) -> bytes
 *       The ustar header block that entries._header formats from the same arguments.
 *
 *   match_starts(buf, limit, kinds) -> tuple of lists
 *       For each kind (lo, alternatives): the starts in [lo, limit) of the matches that finditer of
 *       the alternation of fixed-length byte-class patterns gives over buf from lo (left to right,
 *       without overlap, the first alternative that matches). An alternative is a table of
 *       256 * length bytes, nonzero where byte value v may stand at position i (i * 256 + v).
 *       One pass over buf for all kinds (the x86 scan's VEX and EVEX patterns, rewrite/x86scan.py),
 *       without the GIL, 8 bytes at a time where none of them can start a match.
 *
 *   Chunks(iterator) -> a reader over an iterator of bytes chunks (the flatten's decoded layer)
 *       read(n): up to n bytes, short only at the end (b"" there); a chunk handed on whole is not
 *       copied, any other read copies once (io.BufferedReader over a Python readinto copies twice
 *       and runs Python per refill). view(n): as read, but n bytes that lie within one chunk come
 *       as a read-only memoryview of that chunk (no copy; the chunk lives as long as the view).
 *       skip(n): drops up to n bytes without copying, returns how many.
 *       An exception from the iterator propagates from read/skip, and so does a chunk that is not
 *       bytes (TypeError).
 *
 *   sqfs_tables(order, parents, compress) -> (inode table, directory table, ids, xattr sets) | None
 *       What emit/sqfs.py's SquashWriter.finish makes from its nodes in Python (_inode, _listing,
 *       _Meta): `order` the nodes in inode order (numbered), `parents` each directory's parent
 *       number (0 for the others), `compress` a metadata block's compressor; sets each node's ref.
 *       Anything unexpected (a value out of its field's range, more than 65536 owner ids, a type
 *       it does not know) gives None and the Python code does it all again (and names the error).
 *
 *   sync_range(fd, offset, nbytes) -> None
 *       Starts writing back the dirty pages of that range of a file (Linux sync_file_range,
 *       SYNC_FILE_RANGE_WRITE: no waiting, nothing evicted), without the GIL; OSError on failure; a
 *       no-op where there is no such call. Without the module nothing is started (speedups.py).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <fcntl.h>

#define BLOCK 512

/* Octal digits after optional spaces, then only NULs and spaces to the end of the field.
   Returns 1 and the value, or 0 (not this plain form: the caller defers to Python). */
static int
plain_octal(const unsigned char *p, Py_ssize_t n, long long *out)
{
    Py_ssize_t i = 0;
    long long v = 0;
    while (i < n && p[i] == ' ')
        i++;
    while (i < n && p[i] >= '0' && p[i] <= '7') {
        v = v * 8 + (p[i] - '0');
        i++;
    }
    for (; i < n; i++)
        if (p[i] != 0 && p[i] != ' ')
            return 0;
    *out = v;
    return 1;
}

static Py_ssize_t
cstr_len(const unsigned char *p, Py_ssize_t n)
{
    const unsigned char *z = memchr(p, 0, (size_t)n);
    return z ? (Py_ssize_t)(z - p) : n;
}

static PyObject *
native_fields(PyObject *module, PyObject *arg)
{
    Py_buffer view;
    PyObject *result = NULL, *name = NULL, *link = NULL;
    long long chk, size, mode, uid, gid, mtime, major = 0, minor = 0;

    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    if (view.len != BLOCK) {
        PyErr_SetString(PyExc_ValueError, "a tar header block is 512 bytes");
        goto done;
    }
    const unsigned char *b = view.buf;

    /* the unsigned byte sum with the checksum field read as spaces */
    if (!plain_octal(b + 148, 8, &chk))
        goto defer;
    long long sum = 8 * ' ';
    for (int i = 0; i < BLOCK; i++)
        if (i < 148 || i >= 156)
            sum += b[i];
    if (sum != chk)
        goto defer;

    unsigned char t = b[156];
    if (!plain_octal(b + 124, 12, &size) || !plain_octal(b + 100, 8, &mode) ||
        !plain_octal(b + 108, 8, &uid) || !plain_octal(b + 116, 8, &gid) ||
        !plain_octal(b + 136, 12, &mtime))
        goto defer;
    if (t == '3' || t == '4') {
        if (!plain_octal(b + 329, 8, &major) || !plain_octal(b + 337, 8, &minor))
            goto defer;
    }

    Py_ssize_t nlen = cstr_len(b, 100);
    Py_ssize_t plen = memcmp(b + 257, "ustar\0", 6) == 0 ? cstr_len(b + 345, 155) : 0;
    if (plen) {
        name = PyBytes_FromStringAndSize(NULL, plen + 1 + nlen);
        if (name == NULL)
            goto done;
        char *s = PyBytes_AS_STRING(name);
        memcpy(s, b + 345, (size_t)plen);
        s[plen] = '/';
        memcpy(s + plen + 1, b, (size_t)nlen);
    } else {
        name = PyBytes_FromStringAndSize((const char *)b, nlen);
        if (name == NULL)
            goto done;
    }
    link = PyBytes_FromStringAndSize((const char *)b + 157, cstr_len(b + 157, 100));
    if (link == NULL)
        goto done;
    result = Py_BuildValue("(y#LOLLLLOLL)", (const char *)&b[156], (Py_ssize_t)1, size, name,
                           mode & 07777, uid, gid, mtime, link, major, minor);
    goto done;
defer:
    result = Py_NewRef(Py_None);
done:
    Py_XDECREF(name);
    Py_XDECREF(link);
    PyBuffer_Release(&view);
    return result;
}

/* "%0*o\0" of v into exactly width+1 bytes; 0 when it does not fit */
static int
put_octal(char *p, int width, long long v)
{
    if (v < 0)
        return 0;
    for (int i = width - 1; i >= 0; i--) {
        p[i] = (char)('0' + (v & 7));
        v >>= 3;
    }
    p[width] = 0;
    return v == 0;
}

static void
put_field(char *p, Py_ssize_t width, const Py_buffer *v)
{
    Py_ssize_t n = v->len < width ? v->len : width;
    memcpy(p, v->buf, (size_t)n);   /* the rest of the block is zeroed already */
}

static PyObject *
native_ustar(PyObject *module, PyObject *args)
{
    Py_buffer name, type, link, uname, gname, dev;
    long long mode, uid, gid, size, mtime;
    PyObject *result = NULL;

    if (!PyArg_ParseTuple(args, "y*LLLLLy*y*y*y*y*:ustar", &name, &mode, &uid, &gid, &size, &mtime,
                          &type, &link, &uname, &gname, &dev))
        return NULL;
    if (type.len != 1 || dev.len != 16) {
        PyErr_SetString(PyExc_ValueError, "typeflag is 1 byte and the device fields 16");
        goto done;
    }
    result = PyBytes_FromStringAndSize(NULL, BLOCK);
    if (result == NULL)
        goto done;
    char *h = PyBytes_AS_STRING(result);
    memset(h, 0, BLOCK);
    put_field(h, 100, &name);
    if (!put_octal(h + 100, 7, mode) || !put_octal(h + 108, 7, uid) || !put_octal(h + 116, 7, gid) ||
        !put_octal(h + 124, 11, size) || !put_octal(h + 136, 11, mtime)) {
        Py_CLEAR(result);
        PyErr_SetString(PyExc_ValueError, "overflow in number field");
        goto done;
    }
    memset(h + 148, ' ', 8);
    h[156] = ((const char *)type.buf)[0];
    put_field(h + 157, 100, &link);
    memcpy(h + 257, "ustar\0" "00", 8);
    put_field(h + 265, 32, &uname);
    put_field(h + 297, 32, &gname);
    memcpy(h + 329, dev.buf, 16);
    unsigned long sum = 0;
    for (int i = 0; i < BLOCK; i++)
        sum += (unsigned char)h[i];
    put_octal(h + 148, 6, (long long)sum);   /* at most 512 * 255 < 8**6; byte 155 stays a space */
done:
    PyBuffer_Release(&name);
    PyBuffer_Release(&type);
    PyBuffer_Release(&link);
    PyBuffer_Release(&uname);
    PyBuffer_Release(&gname);
    PyBuffer_Release(&dev);
    return result;
}

#define MAX_KINDS 4
#define MAX_ALTS 4
#define MAX_LEADS 4

typedef struct {
    Py_ssize_t lo, next;             /* scan from lo; the next match may start at next (no overlap) */
    int nalts;
    const unsigned char *tab[MAX_ALTS];
    Py_ssize_t len[MAX_ALTS];
    Py_ssize_t *starts, n, cap;      /* found without the GIL, made a list after */
} kind_t;

static const uint64_t ONES = 0x0101010101010101ULL, HIGHS = 0x8080808080808080ULL;

/* nonzero when some byte of v is zero (exact as a yes/no) */
static inline uint64_t
has_zero_byte(uint64_t v)
{
    return (v - ONES) & ~v & HIGHS;
}

/* The scan proper, without the GIL: 0, or -1 when out of memory. */
static int
scan_kinds(const unsigned char *b, Py_ssize_t n, Py_ssize_t start, Py_ssize_t limit, kind_t *k, int nk,
           const unsigned char *first, const uint64_t *lead, int nlead)
{
    Py_ssize_t p = start;
    while (p < limit) {
        if (nlead && p + 8 <= limit) {           /* skip 8 bytes at a time while none can start a match */
            uint64_t v, hit = 0;
            memcpy(&v, b + p, 8);
            for (int j = 0; j < nlead; j++)
                hit |= has_zero_byte(v ^ lead[j]);
            if (!hit) {
                p += 8;
                continue;
            }
        }
        Py_ssize_t end = p + 8 < limit ? p + 8 : limit;
        for (; p < end; p++) {
            if (!first[b[p]])
                continue;
            for (int i = 0; i < nk; i++) {
                if (p < k[i].next)
                    continue;
                for (int a = 0; a < k[i].nalts; a++) {
                    Py_ssize_t len = k[i].len[a], j = 0;
                    if (p + len > n)
                        continue;
                    const unsigned char *t = k[i].tab[a];
                    while (j < len && t[j * 256 + b[p + j]])
                        j++;
                    if (j == len) {
                        if (k[i].n == k[i].cap) {
                            Py_ssize_t cap = k[i].cap ? 2 * k[i].cap : 256;
                            Py_ssize_t *grown = realloc(k[i].starts, (size_t)cap * sizeof(Py_ssize_t));
                            if (grown == NULL)
                                return -1;
                            k[i].cap = cap;
                            k[i].starts = grown;
                        }
                        k[i].starts[k[i].n++] = p;
                        k[i].next = p + len;
                        break;
                    }
                }
            }
        }
    }
    return 0;
}

static PyObject *
native_match_starts(PyObject *module, PyObject *args)
{
    Py_buffer view;
    Py_ssize_t limit;
    PyObject *kinds, *result = NULL;
    kind_t k[MAX_KINDS];
    unsigned char first[256];
    uint64_t lead[MAX_LEADS];
    int nk = 0, nlead = 0;

    if (!PyArg_ParseTuple(args, "y*nO!:match_starts", &view, &limit, &PyTuple_Type, &kinds))
        return NULL;
    memset(first, 0, sizeof first);
    memset(k, 0, sizeof k);
    nk = (int)PyTuple_GET_SIZE(kinds);
    if (nk > MAX_KINDS) {
        PyErr_SetString(PyExc_ValueError, "too many kinds");
        nk = 0;
        goto done;
    }
    for (int i = 0; i < nk; i++) {
        PyObject *kind = PyTuple_GET_ITEM(kinds, i), *alts;
        if (!PyArg_ParseTuple(kind, "nO!:kind", &k[i].lo, &PyTuple_Type, &alts))
            goto done;
        k[i].nalts = (int)PyTuple_GET_SIZE(alts);
        if (k[i].nalts < 1 || k[i].nalts > MAX_ALTS) {
            PyErr_SetString(PyExc_ValueError, "1 to 4 alternatives");
            goto done;
        }
        for (int a = 0; a < k[i].nalts; a++) {
            PyObject *t = PyTuple_GET_ITEM(alts, a);     /* kept alive by the argument tuple */
            if (!PyBytes_Check(t) || PyBytes_GET_SIZE(t) == 0 || PyBytes_GET_SIZE(t) % 256) {
                PyErr_SetString(PyExc_ValueError, "an alternative is a bytes table of 256 * length");
                goto done;
            }
            k[i].tab[a] = (const unsigned char *)PyBytes_AS_STRING(t);
            k[i].len[a] = PyBytes_GET_SIZE(t) / 256;
            for (int v = 0; v < 256; v++)
                first[v] |= k[i].tab[a][v] != 0;
        }
        if (k[i].lo < 0)
            k[i].lo = 0;
        k[i].next = k[i].lo;
    }
    /* the bytes a match can start with, for the 8-bytes-at-a-time skip (few of them, or none) */
    for (int v = 0; v < 256 && nlead >= 0; v++) {
        if (!first[v])
            continue;
        if (nlead == MAX_LEADS)
            nlead = -1;
        else
            lead[nlead++] = ONES * (uint64_t)v;
    }
    if (nlead < 0)
        nlead = 0;
    Py_ssize_t n = view.len;
    if (limit > n)
        limit = n;
    Py_ssize_t start = limit;
    for (int i = 0; i < nk; i++)
        if (k[i].lo < start)
            start = k[i].lo;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = scan_kinds(view.buf, n, start, limit, k, nk, first, lead, nlead);
    Py_END_ALLOW_THREADS
    if (rc < 0) {
        PyErr_NoMemory();
        goto done;
    }
    if ((result = PyTuple_New(nk)) == NULL)
        goto done;
    for (int i = 0; i < nk; i++) {
        PyObject *list = PyList_New(k[i].n);
        if (list == NULL) {
            Py_CLEAR(result);
            goto done;
        }
        PyTuple_SET_ITEM(result, i, list);
        for (Py_ssize_t j = 0; j < k[i].n; j++) {
            PyObject *v = PyLong_FromSsize_t(k[i].starts[j]);
            if (v == NULL) {
                Py_CLEAR(result);
                goto done;
            }
            PyList_SET_ITEM(list, j, v);
        }
    }
done:
    for (int i = 0; i < nk; i++)
        free(k[i].starts);
    PyBuffer_Release(&view);
    return result;
}

/* -- Chunks: a reader over an iterator of bytes chunks ------------------------------------------- */
typedef struct {
    PyObject_HEAD
    PyObject *it;        /* the iterator; NULL once it is exhausted */
    PyObject *chunk;     /* the current chunk (bytes) or NULL */
    Py_ssize_t pos;      /* bytes of it already handed on */
} ChunksObject;

static int
chunks_init(ChunksObject *self, PyObject *args, PyObject *kw)
{
    PyObject *src;
    if (!PyArg_ParseTuple(args, "O:Chunks", &src))
        return -1;
    PyObject *it = PyObject_GetIter(src);
    if (it == NULL)
        return -1;
    Py_XSETREF(self->it, it);
    Py_CLEAR(self->chunk);
    self->pos = 0;
    return 0;
}

static int
chunks_traverse(ChunksObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->it);
    Py_VISIT(self->chunk);
    return 0;
}

static int
chunks_clear(ChunksObject *self)
{
    Py_CLEAR(self->it);
    Py_CLEAR(self->chunk);
    return 0;
}

static void
chunks_dealloc(ChunksObject *self)
{
    PyObject_GC_UnTrack(self);
    chunks_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* Make the current chunk one with bytes left: 1, or 0 at the end, or -1 with an exception. */
static int
chunks_fill(ChunksObject *self)
{
    while (self->chunk == NULL || self->pos >= PyBytes_GET_SIZE(self->chunk)) {
        Py_CLEAR(self->chunk);
        self->pos = 0;
        if (self->it == NULL)
            return 0;
        /* the iterator may run Python (and wait for the decoder thread): keep self alive and
           consistent across it */
        PyObject *it = self->it;
        Py_INCREF(it);
        PyObject *item = PyIter_Next(it);
        Py_DECREF(it);
        if (item == NULL) {
            if (PyErr_Occurred())
                return -1;
            Py_CLEAR(self->it);
            return 0;
        }
        if (!PyBytes_CheckExact(item)) {
            PyErr_Format(PyExc_TypeError, "Chunks: the iterator gave %.100s, not bytes", Py_TYPE(item)->tp_name);
            Py_DECREF(item);
            return -1;
        }
        Py_XSETREF(self->chunk, item);
        self->pos = 0;
    }
    return 1;
}

/* Up to n bytes across chunks, copied to dest (dropped when dest is NULL): how many, or -1. */
static Py_ssize_t
chunks_take(ChunksObject *self, char *dest, Py_ssize_t n)
{
    Py_ssize_t done = 0;
    while (done < n) {
        int r = chunks_fill(self);
        if (r < 0)
            return -1;
        if (r == 0)
            break;
        Py_ssize_t k = PyBytes_GET_SIZE(self->chunk) - self->pos;
        if (k > n - done)
            k = n - done;
        if (dest != NULL)
            memcpy(dest + done, PyBytes_AS_STRING(self->chunk) + self->pos, (size_t)k);
        self->pos += k;
        done += k;
    }
    return done;
}

/* A read or skip size: 0 or more, else -1 with an exception. */
static Py_ssize_t
size_arg(PyObject *arg)
{
    Py_ssize_t n = PyLong_AsSsize_t(arg);
    if (n < 0 && !PyErr_Occurred())
        PyErr_SetString(PyExc_ValueError, "Chunks: a size must be 0 or more");
    return n < 0 ? -1 : n;
}

/* The size argument and the bytes left in the current chunk (0 at the end): 0, or -1 with an
   exception. */
static int
chunks_start(ChunksObject *self, PyObject *arg, Py_ssize_t *n, Py_ssize_t *avail)
{
    *n = size_arg(arg);
    if (*n < 0)
        return -1;
    int r = chunks_fill(self);
    if (r < 0)
        return -1;
    *avail = r == 0 ? 0 : PyBytes_GET_SIZE(self->chunk) - self->pos;
    return 0;
}

/* read(n) once chunks_start has run: bytes, the chunk itself when it is handed on whole. */
static PyObject *
chunks_bytes(ChunksObject *self, Py_ssize_t n, Py_ssize_t avail)
{
    if (avail == 0 || n == 0)
        return PyBytes_FromStringAndSize(NULL, 0);
    if (n <= avail) {
        PyObject *out;
        if (self->pos == 0 && n == avail) {
            out = self->chunk;                  /* the whole chunk: no copy */
            self->chunk = NULL;
        }
        else {
            out = PyBytes_FromStringAndSize(PyBytes_AS_STRING(self->chunk) + self->pos, n);
            if (out == NULL)
                return NULL;
        }
        self->pos += n;
        return out;
    }
    PyObject *out = PyBytes_FromStringAndSize(NULL, n);
    if (out == NULL)
        return NULL;
    Py_ssize_t got = chunks_take(self, PyBytes_AS_STRING(out), n);
    if (got < 0) {
        Py_DECREF(out);
        return NULL;
    }
    if (got < n && _PyBytes_Resize(&out, got) < 0)
        return NULL;
    return out;
}

static PyObject *
chunks_read(ChunksObject *self, PyObject *arg)
{
    Py_ssize_t n, avail;
    if (chunks_start(self, arg, &n, &avail) < 0)
        return NULL;
    return chunks_bytes(self, n, avail);
}

/* As read, but n bytes within the current chunk come as a read-only memoryview of them (no copy;
   the chunk, immutable bytes, stays alive as long as the view). Across chunks: bytes, as read. */
static PyObject *
chunks_view(ChunksObject *self, PyObject *arg)
{
    Py_ssize_t n, avail;
    if (chunks_start(self, arg, &n, &avail) < 0)
        return NULL;
    if (n == 0 || n > avail || (self->pos == 0 && n == avail))
        return chunks_bytes(self, n, avail);
    PyObject *whole = PyMemoryView_FromObject(self->chunk);
    if (whole == NULL)
        return NULL;
    PyObject *out = PySequence_GetSlice(whole, self->pos, self->pos + n);
    Py_DECREF(whole);
    if (out != NULL)
        self->pos += n;
    return out;
}

static PyObject *
chunks_skip(ChunksObject *self, PyObject *arg)
{
    Py_ssize_t n = size_arg(arg);
    Py_ssize_t done = n < 0 ? -1 : chunks_take(self, NULL, n);
    return done < 0 ? NULL : PyLong_FromSsize_t(done);
}

static PyMethodDef chunks_methods[] = {
    {"read", (PyCFunction)chunks_read, METH_O, "Up to n bytes (short only at the end)."},
    {"view", (PyCFunction)chunks_view, METH_O, "As read; within one chunk a memoryview of it (no copy)."},
    {"skip", (PyCFunction)chunks_skip, METH_O, "Drop up to n bytes; returns how many were dropped."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject ChunksType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "hpcconv._native.Chunks",
    .tp_basicsize = sizeof(ChunksObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "A reader over an iterator of bytes chunks (see the module source).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)chunks_init,
    .tp_dealloc = (destructor)chunks_dealloc,
    .tp_traverse = (traverseproc)chunks_traverse,
    .tp_clear = (inquiry)chunks_clear,
    .tp_methods = chunks_methods,
};

/* -- sqfs_tables: the SquashFS inode and directory tables (emit/sqfs.py's finish) ------------------- */
typedef struct {
    unsigned char *p;
    Py_ssize_t n, cap;
} Buf;

static int
buf_put(Buf *b, const void *data, Py_ssize_t n)
{
    if (n == 0)
        return 0;                       /* (an empty listing: data may be NULL) */
    if (b->n + n > b->cap) {
        Py_ssize_t cap = b->cap ? b->cap : 1 << 16;
        while (cap < b->n + n)
            cap *= 2;
        unsigned char *q = realloc(b->p, (size_t)cap);
        if (q == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        b->p = q;
        b->cap = cap;
    }
    memcpy(b->p + b->n, data, (size_t)n);
    b->n += n;
    return 0;
}

static void
le(unsigned char *p, unsigned long long v, int n)
{
    for (int i = 0; i < n; i++)
        p[i] = (unsigned char)(v >> (8 * i));
}

#define META_SIZE 8192
#define RAW_META 0x8000

typedef struct {
    Buf out, buf;
    PyObject *compress;
} Meta;

static unsigned long long
meta_ref(Meta *m)
{
    return ((unsigned long long)m->out.n << 16) | (unsigned long long)m->buf.n;
}

static int
meta_flush(Meta *m, Py_ssize_t n)
{
    PyObject *chunk = PyBytes_FromStringAndSize((const char *)m->buf.p, n);
    if (chunk == NULL)
        return -1;
    memmove(m->buf.p, m->buf.p + n, (size_t)(m->buf.n - n));
    m->buf.n -= n;
    PyObject *packed = PyObject_CallOneArg(m->compress, chunk);
    int rc = -1;
    if (packed != NULL) {
        Py_buffer v;
        if (PyObject_GetBuffer(packed, &v, PyBUF_SIMPLE) == 0) {
            unsigned char h[2];
            if (v.len < n) {
                le(h, (unsigned long long)v.len, 2);
                rc = buf_put(&m->out, h, 2) < 0 || buf_put(&m->out, v.buf, v.len) < 0 ? -1 : 0;
            }
            else {
                le(h, (unsigned long long)(n | RAW_META), 2);
                rc = buf_put(&m->out, h, 2) < 0 || buf_put(&m->out, PyBytes_AS_STRING(chunk), n) < 0 ? -1 : 0;
            }
            PyBuffer_Release(&v);
        }
        Py_DECREF(packed);
    }
    Py_DECREF(chunk);
    return rc;
}

static int
meta_add(Meta *m, const void *data, Py_ssize_t n)
{
    if (buf_put(&m->buf, data, n) < 0)
        return -1;
    while (m->buf.n >= META_SIZE)
        if (meta_flush(m, META_SIZE) < 0)
            return -1;
    return 0;
}

static PyObject *
meta_finish(Meta *m)
{
    if (m->buf.n && meta_flush(m, m->buf.n) < 0)
        return NULL;
    return PyBytes_FromStringAndSize((const char *)m->out.p, m->out.n);
}

/* An int attribute in [0, max]: 1 and the value, 0 when it is missing, not an int or out of range
   (the caller defers to Python), -1 on an error that is not one of those. */
static int
uattr(PyObject *o, PyObject *name, unsigned long long max, unsigned long long *out)
{
    PyObject *v = PyObject_GetAttr(o, name);
    if (v == NULL) {
        if (!PyErr_ExceptionMatches(PyExc_AttributeError))
            return -1;
        PyErr_Clear();
        return 0;
    }
    int ok = 0;
    if (PyLong_Check(v)) {
        unsigned long long x = PyLong_AsUnsignedLongLong(v);
        if (x == (unsigned long long)-1 && PyErr_Occurred())
            PyErr_Clear();
        else if (x <= max) {
            *out = x;
            ok = 1;
        }
    }
    Py_DECREF(v);
    return ok;
}

/* The index of key in d (given the next index when new); -1 on error. */
static long long
index_of(PyObject *d, PyObject *key)
{
    PyObject *next = PyLong_FromSsize_t(PyDict_GET_SIZE(d));
    if (next == NULL)
        return -1;
    PyObject *v = PyDict_SetDefault(d, key, next);     /* borrowed */
    Py_DECREF(next);
    return v == NULL ? -1 : PyLong_AsLongLong(v);
}

/* The index of an attribute's value in d (see index_of); -1 on error. */
static long long
attr_index(PyObject *o, PyObject *name, PyObject *d)
{
    PyObject *v = PyObject_GetAttr(o, name);
    if (v == NULL)
        return -1;
    long long i = index_of(d, v);
    Py_DECREF(v);
    return i;
}

enum { T_DIR = 1, T_FILE, T_SYMLINK, T_BLOCK, T_CHAR, T_FIFO, T_SOCKET };
#define NO_INDEX 0xFFFFFFFFULL
#define U32 0xFFFFFFFFULL
#define U64 0xFFFFFFFFFFFFFFFFULL

static PyObject *S_type, *S_mode, *S_uid, *S_gid, *S_mtime, *S_number, *S_xattrs, *S_children, *S_nlink,
    *S_ref, *S_blocks, *S_frag, *S_start, *S_size, *S_sparse, *S_target, *S_rdev;

#define DEFER(expr) do { int _r = (expr); if (_r < 0) goto error; if (_r == 0) goto defer; } while (0)

/* One directory's listing (SquashFS directory headers and entries) into lst; 1, 0 (defer), -1. */
static int
listing(PyObject *children, Buf *lst)
{
    PyObject *items = PyDict_Items(children);
    if (items == NULL)
        return -1;
    int rc = -1;
    Buf run = {0};
    if (PyList_Sort(items) < 0)
        goto out;
    Py_ssize_t count = 0;
    unsigned long long block = 0, base = 0;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(items); i++) {
        PyObject *it = PyList_GET_ITEM(items, i), *name = PyTuple_GET_ITEM(it, 0), *child = PyTuple_GET_ITEM(it, 1);
        unsigned long long ref, number, type;
        int r;
        if (!PyBytes_Check(name) || PyBytes_GET_SIZE(name) < 1 || PyBytes_GET_SIZE(name) > 0x10000)
            { rc = 0; goto out; }
        if ((r = uattr(child, S_ref, U64, &ref)) <= 0 || (r = uattr(child, S_number, U32, &number)) <= 0 ||
            (r = uattr(child, S_type, 0xFFFF, &type)) <= 0)
            { rc = r; goto out; }
        unsigned long long cblock = ref >> 16, coff = ref & 0xFFFF;
        long long delta = (long long)number - (long long)base;
        if (count == 0 || cblock != block || count == 256 || delta > 32767 || delta < -32767) {
            if (count) {
                unsigned char h[12];
                le(h, (unsigned long long)(count - 1), 4); le(h + 4, block, 4); le(h + 8, base, 4);
                if (buf_put(lst, h, 12) < 0 || buf_put(lst, run.p, run.n) < 0)
                    goto out;
            }
            if (cblock > U32)
                { rc = 0; goto out; }
            run.n = 0;
            count = 0;
            block = cblock;
            base = number;
            delta = 0;
        }
        unsigned char e[8];
        le(e, coff, 2); le(e + 2, (unsigned long long)(delta & 0xFFFF), 2); le(e + 4, type, 2);
        le(e + 6, (unsigned long long)(PyBytes_GET_SIZE(name) - 1), 2);
        if (buf_put(&run, e, 8) < 0 || buf_put(&run, PyBytes_AS_STRING(name), PyBytes_GET_SIZE(name)) < 0)
            goto out;
        count++;
    }
    if (count) {
        unsigned char h[12];
        le(h, (unsigned long long)(count - 1), 4); le(h + 4, block, 4); le(h + 8, base, 4);
        if (buf_put(lst, h, 12) < 0 || buf_put(lst, run.p, run.n) < 0)
            goto out;
    }
    rc = 1;
out:
    free(run.p);
    Py_DECREF(items);
    return rc;
}

static PyObject *
native_sqfs_tables(PyObject *module, PyObject *args)
{
    PyObject *order, *parents, *compress;
    if (!PyArg_ParseTuple(args, "O!O!O:sqfs_tables", &PyList_Type, &order, &PyList_Type, &parents, &compress))
        return NULL;
    if (PyList_GET_SIZE(parents) != PyList_GET_SIZE(order)) {
        PyErr_SetString(PyExc_ValueError, "sqfs_tables: order and parents differ in length");
        return NULL;
    }
    PyObject *ids = PyDict_New(), *xsets = PyDict_New(), *result = NULL;
    PyObject *xattrs = NULL, *children = NULL, *blocks = NULL, *frag = NULL, *target = NULL;
    Meta inodes = {{0}, {0}, compress}, dirs = {{0}, {0}, compress};
    Buf rec = {0}, lst = {0};
    if (ids == NULL || xsets == NULL)
        goto error;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(order); i++) {
        PyObject *node = PyList_GET_ITEM(order, i);
        unsigned long long t, mode, mtime, number, nlink, xattr = NO_INDEX;
        DEFER(uattr(node, S_type, 7, &t));
        DEFER(uattr(node, S_mode, 0xFFFF, &mode));
        DEFER(uattr(node, S_mtime, U32, &mtime));
        DEFER(uattr(node, S_number, U32, &number));
        DEFER(uattr(node, S_nlink, U32, &nlink));
        long long uid = attr_index(node, S_uid, ids), gid = uid < 0 ? -1 : attr_index(node, S_gid, ids);
        if (gid < 0)
            goto error;
        if (PyDict_GET_SIZE(ids) > 65536)
            goto defer;                          /* Python names the error */
        Py_XSETREF(xattrs, PyObject_GetAttr(node, S_xattrs));
        if (xattrs == NULL)
            goto error;
        int has = PyObject_IsTrue(xattrs);
        if (has < 0)
            goto error;
        if (has) {
            if (!PyDict_Check(xattrs))
                goto defer;
            PyObject *items = PyDict_Items(xattrs);
            if (items == NULL)
                goto error;
            if (PyList_Sort(items) < 0) {
                Py_DECREF(items);
                PyErr_Clear();
                goto defer;
            }
            PyObject *key = PyList_AsTuple(items);
            Py_DECREF(items);
            if (key == NULL)
                goto error;
            long long x = index_of(xsets, key);
            Py_DECREF(key);
            if (x < 0)
                goto error;
            xattr = (unsigned long long)x;
        }
        int ext = xattr != NO_INDEX;
        rec.n = 0;
        unsigned char b[64];
        if (t == T_DIR) {
            unsigned long long parent;
            PyObject *pn = PyList_GET_ITEM(parents, i);
            if (!PyLong_Check(pn) || (parent = PyLong_AsUnsignedLongLong(pn)) > U32) {
                PyErr_Clear();
                goto defer;
            }
            Py_XSETREF(children, PyObject_GetAttr(node, S_children));
            if (children == NULL)
                goto error;
            if (!PyDict_Check(children))
                goto defer;
            unsigned long long sub = 0;
            PyObject *k, *v;
            Py_ssize_t pos = 0;
            while (PyDict_Next(children, &pos, &k, &v)) {
                unsigned long long ct;
                DEFER(uattr(v, S_type, 0xFFFF, &ct));
                sub += ct == T_DIR;
            }
            nlink = 2 + sub;
            unsigned long long lref = meta_ref(&dirs);
            lst.n = 0;
            DEFER(listing(children, &lst));
            if (meta_add(&dirs, lst.p, lst.n) < 0)
                goto error;
            unsigned long long llen = (unsigned long long)lst.n + 3, lblock = lref >> 16, loff = lref & 0xFFFF;
            if (lblock > U32 || nlink > U32)
                goto defer;
            ext = ext || llen > 0xFFFF;
            if (ext) {
                if (llen > U32)
                    goto defer;
                /* nlink, size, block, parent, index count (none), offset, xattr */
                le(b, nlink, 4); le(b + 4, llen, 4); le(b + 8, lblock, 4); le(b + 12, parent, 4);
                le(b + 16, 0, 2); le(b + 18, loff, 2); le(b + 20, xattr, 4);
                if (buf_put(&rec, b, 24) < 0)
                    goto error;
            }
            else {
                le(b, lblock, 4); le(b + 4, nlink, 4); le(b + 8, llen, 2); le(b + 10, loff, 2); le(b + 12, parent, 4);
                if (buf_put(&rec, b, 16) < 0)
                    goto error;
            }
        }
        else if (t == T_FILE) {
            unsigned long long start, size, sparse, fidx, foff;
            DEFER(uattr(node, S_start, U64, &start));
            DEFER(uattr(node, S_size, U64, &size));
            DEFER(uattr(node, S_sparse, U64, &sparse));
            Py_XSETREF(frag, PyObject_GetAttr(node, S_frag));
            if (frag == NULL)
                goto error;
            if (!PyTuple_Check(frag) || PyTuple_GET_SIZE(frag) != 2 || !PyLong_Check(PyTuple_GET_ITEM(frag, 0)) ||
                !PyLong_Check(PyTuple_GET_ITEM(frag, 1)))
                goto defer;
            fidx = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(frag, 0));
            foff = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(frag, 1));
            if (PyErr_Occurred() || fidx > U32 || foff > U32) {
                PyErr_Clear();
                goto defer;
            }
            ext = ext || nlink > 1 || sparse || size > U32 || start > U32;
            if (ext) {
                le(b, start, 8); le(b + 8, size, 8); le(b + 16, sparse, 8); le(b + 24, nlink, 4);
                le(b + 28, fidx, 4); le(b + 32, foff, 4); le(b + 36, xattr, 4);
                if (buf_put(&rec, b, 40) < 0)
                    goto error;
            }
            else {
                le(b, start, 4); le(b + 4, fidx, 4); le(b + 8, foff, 4); le(b + 12, size, 4);
                if (buf_put(&rec, b, 16) < 0)
                    goto error;
            }
            Py_XSETREF(blocks, PyObject_GetAttr(node, S_blocks));
            if (blocks == NULL)
                goto error;
            if (blocks != Py_None) {
                if (!PyList_Check(blocks))
                    goto defer;
                for (Py_ssize_t j = 0; j < PyList_GET_SIZE(blocks); j++) {
                    PyObject *s = PyList_GET_ITEM(blocks, j);
                    unsigned long long z;
                    if (!PyLong_Check(s) || (z = PyLong_AsUnsignedLongLong(s)) > U32) {
                        PyErr_Clear();
                        goto defer;
                    }
                    le(b, z, 4);
                    if (buf_put(&rec, b, 4) < 0)
                        goto error;
                }
            }
        }
        else if (t == T_SYMLINK) {
            Py_XSETREF(target, PyObject_GetAttr(node, S_target));
            if (target == NULL)
                goto error;
            if (!PyBytes_Check(target) || (unsigned long long)PyBytes_GET_SIZE(target) > U32)
                goto defer;
            le(b, nlink, 4); le(b + 4, (unsigned long long)PyBytes_GET_SIZE(target), 4);
            if (buf_put(&rec, b, 8) < 0 || buf_put(&rec, PyBytes_AS_STRING(target), PyBytes_GET_SIZE(target)) < 0)
                goto error;
            if (ext) {
                le(b, xattr, 4);
                if (buf_put(&rec, b, 4) < 0)
                    goto error;
            }
        }
        else if (t == T_BLOCK || t == T_CHAR) {
            unsigned long long rdev;
            DEFER(uattr(node, S_rdev, U32, &rdev));
            le(b, nlink, 4); le(b + 4, rdev, 4); le(b + 8, xattr, 4);
            if (buf_put(&rec, b, ext ? 12 : 8) < 0)
                goto error;
        }
        else {
            le(b, nlink, 4); le(b + 4, xattr, 4);
            if (buf_put(&rec, b, ext ? 8 : 4) < 0)
                goto error;
        }
        unsigned long long ref = meta_ref(&inodes);
        PyObject *r = PyLong_FromUnsignedLongLong(ref);
        if (r == NULL)
            goto error;
        int set = PyObject_SetAttr(node, S_ref, r);
        Py_DECREF(r);
        if (set < 0)
            goto error;
        unsigned char h[16];
        le(h, ext ? t + 7 : t, 2); le(h + 2, mode, 2); le(h + 4, (unsigned long long)uid, 2);
        le(h + 6, (unsigned long long)gid, 2); le(h + 8, mtime, 4); le(h + 12, number, 4);
        if (meta_add(&inodes, h, 16) < 0 || meta_add(&inodes, rec.p, rec.n) < 0)
            goto error;
    }
    PyObject *itab = meta_finish(&inodes);
    PyObject *dtab = itab ? meta_finish(&dirs) : NULL;
    if (dtab != NULL)
        result = Py_BuildValue("(NNOO)", itab, dtab, ids, xsets);
    else
        Py_XDECREF(itab);
    goto done;
defer:
    result = Py_NewRef(Py_None);
    goto done;
error:
    result = NULL;
done:
    Py_XDECREF(ids);
    Py_XDECREF(xsets);
    Py_XDECREF(xattrs);
    Py_XDECREF(children);
    Py_XDECREF(blocks);
    Py_XDECREF(frag);
    Py_XDECREF(target);
    free(inodes.out.p); free(inodes.buf.p); free(dirs.out.p); free(dirs.buf.p); free(rec.p); free(lst.p);
    return result;
}

/* Start writing back the dirty pages of a file range (Linux sync_file_range with
   SYNC_FILE_RANGE_WRITE: no waiting for the writes, nothing evicted), without the GIL. A writer that
   will fsync at its end calls it behind itself, so that the fsync finds little left to write.
   Elsewhere a no-op. */
static PyObject *
native_sync_range(PyObject *module, PyObject *args)
{
    int fd;
    long long off, n;
    if (!PyArg_ParseTuple(args, "iLL:sync_range", &fd, &off, &n))
        return NULL;
#if defined(__linux__) && defined(SYNC_FILE_RANGE_WRITE)
    int r;
    Py_BEGIN_ALLOW_THREADS
    r = sync_file_range(fd, (off_t)off, (off_t)n, SYNC_FILE_RANGE_WRITE);
    Py_END_ALLOW_THREADS
    if (r < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
#endif
    Py_RETURN_NONE;
}

/* adjoin(a, b): one read-only memoryview of a's bytes followed by b's, when both are 1-D byte
   memoryviews of the same bytes object and b begins where a ends (two pieces of one decoded chunk
   read one after the other: a file's head and what follows it); else None, and the caller joins
   them (a copy). */
static PyObject *
native_adjoin(PyObject *module, PyObject *args)
{
    PyObject *a, *b;
    if (!PyArg_ParseTuple(args, "OO:adjoin", &a, &b))
        return NULL;
    if (!PyMemoryView_Check(a) || !PyMemoryView_Check(b))
        Py_RETURN_NONE;
    Py_buffer *va = PyMemoryView_GET_BUFFER(a), *vb = PyMemoryView_GET_BUFFER(b);
    PyObject *obj = va->obj;
    if (obj == NULL || obj != vb->obj || !PyBytes_CheckExact(obj) || va->ndim != 1 || vb->ndim != 1
        || va->itemsize != 1 || vb->itemsize != 1 || (va->strides != NULL && va->strides[0] != 1)
        || (vb->strides != NULL && vb->strides[0] != 1))
        Py_RETURN_NONE;
    const char *base = PyBytes_AS_STRING(obj);
    const char *pa = (const char *)va->buf, *pb = (const char *)vb->buf;
    Py_ssize_t size = PyBytes_GET_SIZE(obj);
    if (pa < base || pa + va->len != pb || pb + vb->len > base + size)
        Py_RETURN_NONE;
    PyObject *whole = PyMemoryView_FromObject(obj);
    if (whole == NULL)
        return NULL;
    PyObject *out = PySequence_GetSlice(whole, pa - base, pb + vb->len - base);
    Py_DECREF(whole);
    return out;
}

static PyMethodDef methods[] = {
    {"adjoin", native_adjoin, METH_VARARGS, "One memoryview of two adjacent views of one bytes object, or None."},
    {"sync_range", native_sync_range, METH_VARARGS, "Start the write-back of a file range (see the module source)."},
    {"fields", native_fields, METH_O, "Parse a plain tar header block (see the module source), or None."},
    {"ustar", native_ustar, METH_VARARGS, "Format a ustar header block like entries._header."},
    {"match_starts", native_match_starts, METH_VARARGS, "Starts of fixed-length byte-class matches (see the module source)."},
    {"sqfs_tables", native_sqfs_tables, METH_VARARGS, "The SquashFS inode and directory tables (see the module source)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_native", NULL, 0, methods};

PyMODINIT_FUNC
PyInit__native(void)
{
    if (PyType_Ready(&ChunksType) < 0)
        return NULL;
#define INTERN(v, s) if ((v = PyUnicode_InternFromString(s)) == NULL) return NULL
    INTERN(S_type, "type"); INTERN(S_mode, "mode"); INTERN(S_uid, "uid"); INTERN(S_gid, "gid");
    INTERN(S_mtime, "mtime"); INTERN(S_number, "number"); INTERN(S_xattrs, "xattrs");
    INTERN(S_children, "children"); INTERN(S_nlink, "nlink"); INTERN(S_ref, "ref"); INTERN(S_blocks, "blocks");
    INTERN(S_frag, "frag"); INTERN(S_start, "start"); INTERN(S_size, "size"); INTERN(S_sparse, "sparse");
    INTERN(S_target, "target"); INTERN(S_rdev, "rdev");
#undef INTERN
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&ChunksType);
    if (PyModule_AddObject(m, "Chunks", (PyObject *)&ChunksType) < 0) {
        Py_DECREF(&ChunksType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
