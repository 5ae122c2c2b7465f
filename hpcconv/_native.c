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
 *       and runs Python per refill). skip(n): drops up to n bytes without copying, returns how many.
 *       An exception from the iterator propagates from read/skip, and so does a chunk that is not
 *       bytes (TypeError).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

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

static PyObject *
chunks_read(ChunksObject *self, PyObject *arg)
{
    Py_ssize_t n = PyLong_AsSsize_t(arg);
    if (n == -1 && PyErr_Occurred())
        return NULL;
    if (n < 0) {
        PyErr_SetString(PyExc_ValueError, "Chunks.read needs a size of 0 or more");
        return NULL;
    }
    int r = chunks_fill(self);
    if (r < 0)
        return NULL;
    if (r == 0 || n == 0)
        return PyBytes_FromStringAndSize(NULL, 0);
    Py_ssize_t avail = PyBytes_GET_SIZE(self->chunk) - self->pos;
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
    Py_ssize_t got = 0;
    while (got < n) {
        r = chunks_fill(self);
        if (r < 0) {
            Py_DECREF(out);
            return NULL;
        }
        if (r == 0)
            break;
        Py_ssize_t k = PyBytes_GET_SIZE(self->chunk) - self->pos;
        if (k > n - got)
            k = n - got;
        memcpy(PyBytes_AS_STRING(out) + got, PyBytes_AS_STRING(self->chunk) + self->pos, (size_t)k);
        self->pos += k;
        got += k;
    }
    if (got < n && _PyBytes_Resize(&out, got) < 0)
        return NULL;
    return out;
}

static PyObject *
chunks_skip(ChunksObject *self, PyObject *arg)
{
    Py_ssize_t n = PyLong_AsSsize_t(arg);
    if (n == -1 && PyErr_Occurred())
        return NULL;
    Py_ssize_t done = 0;
    while (done < n) {
        int r = chunks_fill(self);
        if (r < 0)
            return NULL;
        if (r == 0)
            break;
        Py_ssize_t k = PyBytes_GET_SIZE(self->chunk) - self->pos;
        if (k > n - done)
            k = n - done;
        self->pos += k;
        done += k;
    }
    return PyLong_FromSsize_t(done);
}

static PyMethodDef chunks_methods[] = {
    {"read", (PyCFunction)chunks_read, METH_O, "Up to n bytes (short only at the end)."},
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

static PyMethodDef methods[] = {
    {"fields", native_fields, METH_O, "Parse a plain tar header block (see the module source), or None."},
    {"ustar", native_ustar, METH_VARARGS, "Format a ustar header block like entries._header."},
    {"match_starts", native_match_starts, METH_VARARGS, "Starts of fixed-length byte-class matches (see the module source)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_native", NULL, 0, methods};

PyMODINIT_FUNC
PyInit__native(void)
{
    if (PyType_Ready(&ChunksType) < 0)
        return NULL;
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
