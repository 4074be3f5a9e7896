/* The prediction log's tap, the usual answer's path in C (agent/predlog_tap.py `Tap`).
 *
 * Why C: the tap runs on the serving thread after every answer, and what it costs there is
 * mostly the Python machinery it touches, cold between two requests (a frame, a dozen
 * attribute reads, a header packed into a new bytes object), not its copy of ~100 bytes. Pinned
 * on one CPU with its client, a tap written in Python cost a single binary answer 9% of its
 * p99 and one that only appended the answer 4%; a C function called there ~1% (bench/
 * predlog_bench.py, docs/operations.md "What it costs"). So the usual answer (one row, a
 * decision, not a fail, not drawn for the capture sample, the same model as the last) is
 * recorded here, and everything else goes to the Python tap's `_slow`, which decides what to
 * record and hands it back to `append`. agent/predlog_tap.py keeps a pure-Python tap with the
 * same stream for where this module is not built; tests/test_predlog_tap.py checks both write
 * the same bytes.
 *
 * Locking: none. Every method here runs under the GIL and calls no Python code (and allocates
 * no object the collector tracks) between reading the buffer's state and writing it, so a
 * `take` on another thread sees each message whole or not at all. Python code (the model
 * getter, a test's clock, `_slow`) runs only before that point.
 *
 * A message is MSG (little-endian "<BIIdII": kind, rows, model token, time, answer length,
 * extra length), the answer, the extra: agent/predlog_tap.py's docstring. LAYOUT, read there at
 * import, names the protocol constants this file assumes; a mismatch keeps the Python tap.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

#define MAGIC_BYTE 0x89 /* agent.protocol.MAGIC[0] */
#define RESULT_TYPE 2   /* FrameType.RESULT */
#define DECISION_FAIL 1 /* Decision.FAIL */
#define RESULT_OFF 48   /* HEADER + RESULT_BLOCK: the model version starts here */
#define MSG_SIZE 25     /* struct MSG */
#define BINARY_ONE 1
#define JSON_ONE 3
#define KEEP_BYTES (2 << 20) /* the buffer kept between takes, at most */

typedef struct {
    PyObject_HEAD
    PyObject *active;   /* () -> the predictor answering now */
    PyObject *slow;     /* (buf, start, end, answer, sampled): all but the usual answer */
    PyObject *clock;    /* () -> float; None: CLOCK_REALTIME */
    PyObject *dispatch; /* agent.dispatch.Dispatcher: its `parsed` (answer, row, decision) */
    PyObject *wake;     /* None, or () called once per take past wake_bytes waiting */
    char *buf;          /* the messages not taken yet: `len` bytes of `size` */
    Py_ssize_t len, size;
    char *spare;        /* the other buffer (NULL: none), `spare_size` bytes: see take */
    Py_ssize_t spare_size;
    PyObject *fresh;    /* [(token, predictor)] first seen since the last take */
    PyObject *retired;  /* [predictor] replaced since the last take */
    PyObject *last_p;   /* the predictor of the last message (a strong reference), or NULL */
    double rate;
    int fails;
    int woken;
    Py_ssize_t cap, cap_bytes, wake_bytes, backlog, n, dropped;
    unsigned long token;
    uint64_t rng;
} Recorder;

static PyObject *parsed_name; /* "parsed" */

/* xorshift64*: the capture sample's draw. Not for secrets; uniform enough for a 1% sample. */
static double draw(Recorder *self) {
    uint64_t x = self->rng;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    self->rng = x;
    return (double)((x * 0x2545F4914F6CDD1DULL) >> 11) * (1.0 / 9007199254740992.0);
}

static int read_clock(Recorder *self, double *t) {
    if (self->clock == Py_None) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        *t = (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
        return 0;
    }
    PyObject *v = PyObject_CallNoArgs(self->clock);
    if (v == NULL)
        return -1;
    *t = PyFloat_AsDouble(v);
    Py_DECREF(v);
    return (*t == -1.0 && PyErr_Occurred()) ? -1 : 0;
}

static void put_u32(char *p, uint32_t v) {
    p[0] = (char)v; p[1] = (char)(v >> 8); p[2] = (char)(v >> 16); p[3] = (char)(v >> 24);
}

/* MSG at `p`, little-endian whatever the host (the writer reads it with struct "<"). */
static void pack_msg(char *p, int kind, uint32_t rows, uint32_t token, double t,
                     uint32_t alen, uint32_t xlen) {
    uint64_t bits;
    memcpy(&bits, &t, 8);
    p[0] = (char)kind;
    put_u32(p + 1, rows);
    put_u32(p + 5, token);
    for (int i = 0; i < 8; i++)
        p[9 + i] = (char)(bits >> (8 * i));
    put_u32(p + 17, alen);
    put_u32(p + 21, xlen);
}

/* The predictor `p` answers from the next message on: a new token, announced by the next take.
 * Allocates first (the tuple may start a collection, which may run Python code), then
 * changes the state. */
static int new_model(Recorder *self, PyObject *p) {
    PyObject *tok = PyLong_FromUnsignedLong(self->token + 1);
    if (tok == NULL)
        return -1;
    PyObject *pair = PyTuple_Pack(2, tok, p);
    Py_DECREF(tok);
    if (pair == NULL)
        return -1;
    if (PyList_Append(self->fresh, pair) < 0) {
        Py_DECREF(pair);
        return -1;
    }
    Py_DECREF(pair);
    if (self->last_p != NULL) {
        if (PyList_Append(self->retired, self->last_p) < 0)
            return -1;
        Py_DECREF(self->last_p);
    }
    Py_INCREF(p);
    self->last_p = p;
    self->token += 1;
    return 0;
}

/* `n` more bytes at the end of the buffer: where they start (NULL: out of memory). The buffer
 * and its spare are kept from take to take (up to KEEP_BYTES each): the serving thread does
 * not grow a fresh buffer through a chain of reallocs after every take, and a take copies
 * without the GIL. (Against a bytearray swapped out at each take, in the same bench rounds:
 * the serving thread's page faults per answer 0.0176 / 0.0143 against 0.0250 / 0.0141, p99
 * alike: no clear difference either way.) */
static char *grow(Recorder *self, Py_ssize_t n) {
    if (self->len + n > self->size) {
        Py_ssize_t size = self->size ? self->size : 64 * 1024;
        while (size < self->len + n)
            size *= 2;
        char *b = PyMem_RawRealloc(self->buf, (size_t)size);
        if (b == NULL) {
            PyErr_NoMemory();
            return NULL;
        }
        self->buf = b;
        self->size = size;
    }
    char *at = self->buf + self->len;
    self->len += n;
    return at;
}

/* `_slow(buf, start, end, answer, sampled)`: sampled None when not drawn here. */
static PyObject *call_slow(Recorder *self, PyObject *const *args, PyObject *sampled) {
    PyObject *five[5] = {args[0], args[1], args[2], args[3], sampled};
    return PyObject_Vectorcall(self->slow, five, 5, NULL);
}

/* record(buf, start, end, answer): the server's tap (predlog_tap.py `_PyRecorder.record`). */
static PyObject *Recorder_record(Recorder *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "record(buf, start, end, answer)");
        return NULL;
    }
    if (self->n >= self->cap ||
        self->len + self->backlog >= self->cap_bytes) {
        self->dropped += 1;
        Py_RETURN_NONE;
    }
    PyObject *answer = args[3];
    if (!PyBytes_CheckExact(answer))
        return call_slow(self, args, Py_None);
    const unsigned char *a = (const unsigned char *)PyBytes_AS_STRING(answer);
    Py_ssize_t alen = PyBytes_GET_SIZE(answer);
    int kind, sampled;
    if (alen > 5 && a[0] == MAGIC_BYTE && a[5] != RESULT_TYPE)
        Py_RETURN_NONE;  /* an error frame: not a decision */
    if (alen > RESULT_OFF && a[0] == MAGIC_BYTE) {
        uint32_t rows = (uint32_t)a[12] | (uint32_t)a[13] << 8 | (uint32_t)a[14] << 16 |
                        (uint32_t)a[15] << 24;
        Py_ssize_t vlen = (Py_ssize_t)a[40] | (Py_ssize_t)a[41] << 8;
        Py_ssize_t at = RESULT_OFF + vlen + ((8 - vlen % 8) % 8) + 8;  /* the decision */
        if (rows != 1 || at >= alen)
            return call_slow(self, args, Py_None);
        sampled = (self->fails && a[at] == DECISION_FAIL) || draw(self) < self->rate;
        kind = BINARY_ONE;
    } else if (alen > 0 && a[0] == '{') {
        PyObject *parsed = PyObject_GetAttr(self->dispatch, parsed_name);
        if (parsed == NULL) {
            PyErr_Clear();
            return call_slow(self, args, Py_None);
        }
        if (!PyTuple_CheckExact(parsed) || PyTuple_GET_SIZE(parsed) < 3 ||
            PyTuple_GET_ITEM(parsed, 0) != answer) {
            Py_DECREF(parsed);
            return call_slow(self, args, Py_None);
        }
        long decision = PyLong_AsLong(PyTuple_GET_ITEM(parsed, 2));
        Py_DECREF(parsed);
        if (decision == -1 && PyErr_Occurred()) {
            PyErr_Clear();
            return call_slow(self, args, Py_None);
        }
        if (decision > DECISION_FAIL)
            Py_RETURN_NONE;  /* refused: not a decision, not logged */
        sampled = (self->fails && decision == DECISION_FAIL) || draw(self) < self->rate;
        kind = JSON_ONE;
    } else {
        return call_slow(self, args, Py_None);
    }
    if (sampled)
        return call_slow(self, args, Py_True);
    PyObject *p = PyObject_CallNoArgs(self->active);
    if (p == NULL) {
        PyErr_Clear();
        return call_slow(self, args, Py_False);
    }
    Py_DECREF(p);  /* only its identity is read; the runtime holds it */
    double t;
    if (p != self->last_p || read_clock(self, &t) < 0) {
        PyErr_Clear();  /* a new model (rare): `_slow` reads it again and `append` announces it */
        return call_slow(self, args, Py_False);
    }
    /* From here no Python code runs: the message goes in whole. */
    char *dst = grow(self, MSG_SIZE + alen);
    if (dst == NULL) {
        PyErr_Clear();
        self->dropped += 1;
        Py_RETURN_NONE;
    }
    pack_msg(dst, kind, 1, (uint32_t)self->token, t, (uint32_t)alen, 0);
    memcpy(dst + MSG_SIZE, a, (size_t)alen);
    self->n += 1;
    Py_RETURN_NONE;
}

/* append(kind, rows, p, t, answer, extra): one message as `_slow` decided it; `extra` is a
 * bytes-like object or a tuple of them (copied in order). */
static PyObject *Recorder_append(Recorder *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 6) {
        PyErr_SetString(PyExc_TypeError, "append(kind, rows, p, t, answer, extra)");
        return NULL;
    }
    int kind = PyLong_AsLong(args[0]) & 0xFF;
    unsigned long rows = PyLong_AsUnsignedLong(args[1]);
    double t = PyFloat_AsDouble(args[3]);
    if (PyErr_Occurred())
        return NULL;
    PyObject *p = args[2];
    PyObject *pieces = PyTuple_Check(args[5]) ? args[5] : NULL;
    Py_ssize_t npieces = pieces ? PyTuple_GET_SIZE(pieces) : 1;
    if (npieces > 8) {
        PyErr_SetString(PyExc_ValueError, "at most 8 extra pieces");
        return NULL;
    }
    Py_buffer views[9];
    int held = 0;
    Py_ssize_t xlen = 0;
    PyObject *result = NULL;
    if (PyObject_GetBuffer(args[4], &views[0], PyBUF_SIMPLE) < 0)
        return NULL;
    held = 1;
    for (Py_ssize_t i = 0; i < npieces; i++) {
        PyObject *piece = pieces ? PyTuple_GET_ITEM(pieces, i) : args[5];
        if (PyObject_GetBuffer(piece, &views[held], PyBUF_SIMPLE) < 0)
            goto done;
        xlen += views[held].len;
        held++;
    }
    if (p != self->last_p && new_model(self, p) < 0)
        goto done;
    /* From here no Python code runs. */
    char *dst = grow(self, MSG_SIZE + views[0].len + xlen);
    if (dst == NULL)
        goto done;
    pack_msg(dst, kind, (uint32_t)rows, (uint32_t)self->token, t, (uint32_t)views[0].len,
             (uint32_t)xlen);
    dst += MSG_SIZE;
    for (int i = 0; i < held; i++) {
        memcpy(dst, views[i].buf, (size_t)views[i].len);
        dst += views[i].len;
    }
    self->n += 1;
    if (xlen && self->len > self->wake_bytes && !self->woken &&
        self->wake != Py_None) {
        self->woken = 1;
        PyObject *r = PyObject_CallNoArgs(self->wake);
        if (r == NULL)
            goto done;
        Py_DECREF(r);
    }
    result = Py_NewRef(Py_None);
done:
    for (int i = 0; i < held; i++)
        PyBuffer_Release(&views[i]);
    return result;
}

/* send(msg) -> bool: a message of another kind (labels) behind the answers; False when full. */
static PyObject *Recorder_send(Recorder *self, PyObject *msg) {
    Py_buffer view;
    if (PyObject_GetBuffer(msg, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    PyObject *result = Py_False;
    if (self->len + self->backlog < self->cap_bytes) {
        char *dst = grow(self, view.len);
        if (dst == NULL) {
            PyBuffer_Release(&view);
            return NULL;
        }
        memcpy(dst, view.buf, (size_t)view.len);
        result = Py_True;
    }
    PyBuffer_Release(&view);
    return Py_NewRef(result);
}

/* take() -> (bytes, answers, [(token, predictor)], [predictor]): everything since the last
 * take. The two buffers change places: the serving thread goes on in the spare one while the
 * taken one is copied out without the GIL (a burst can leave MBs to copy), and that one is
 * the next spare. Both stay mapped (up to KEEP_BYTES each). Every object the collector tracks
 * is made before the swap. */
static PyObject *Recorder_take(Recorder *self, PyObject *Py_UNUSED(ignored)) {
    PyObject *fresh = PyList_New(0);
    PyObject *retired = PyList_New(0);
    PyObject *result = PyTuple_New(4);
    PyObject *count = NULL, *out = NULL;
    if (fresh == NULL || retired == NULL || result == NULL)
        goto fail;
    /* neither is tracked: no Python code runs from here to the swap */
    count = PyLong_FromSsize_t(self->n);
    out = PyBytes_FromStringAndSize(NULL, self->len);
    if (count == NULL || out == NULL)
        goto fail;
    /* the swap: the tuple takes over the references */
    PyTuple_SET_ITEM(result, 0, out);
    PyTuple_SET_ITEM(result, 1, count);
    PyTuple_SET_ITEM(result, 2, self->fresh);
    PyTuple_SET_ITEM(result, 3, self->retired);
    char *taken = self->buf;
    Py_ssize_t taken_len = self->len, taken_size = self->size;
    self->buf = self->spare;
    self->size = self->spare_size;
    self->spare = NULL;
    self->spare_size = 0;
    self->len = 0;
    self->fresh = fresh;
    self->retired = retired;
    self->n = 0;
    self->woken = 0;
    if (taken_len) {
        Py_BEGIN_ALLOW_THREADS
        memcpy(PyBytes_AS_STRING(out), taken, (size_t)taken_len);
        Py_END_ALLOW_THREADS
    }
    if (taken_size > KEEP_BYTES) {  /* after a burst: give the rest back */
        char *b = PyMem_RawRealloc(taken, KEEP_BYTES);
        if (b != NULL) {
            taken = b;
            taken_size = KEEP_BYTES;
        }
    }
    if (self->spare == NULL) {  /* (another take meanwhile may have put one back) */
        self->spare = taken;
        self->spare_size = taken_size;
    } else {
        PyMem_RawFree(taken);
    }
    return result;
fail:
    Py_XDECREF(out); Py_XDECREF(count); Py_XDECREF(fresh); Py_XDECREF(retired);
    Py_XDECREF(result);
    return NULL;
}

static PyObject *Recorder_waiting(Recorder *self, PyObject *Py_UNUSED(ignored)) {
    return PyLong_FromSsize_t(self->n);
}

static int Recorder_init(Recorder *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"active", "slow", "clock", "rate", "fails", "cap", "cap_bytes",
                             "wake_bytes", "seed", NULL};
    PyObject *active, *slow, *clock;
    double rate;
    int fails;
    Py_ssize_t cap, cap_bytes, wake_bytes;
    unsigned long long seed;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOO$dpnnnK", kwlist, &active, &slow, &clock,
                                     &rate, &fails, &cap, &cap_bytes, &wake_bytes, &seed))
        return -1;
    if (self->fresh != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Recorder is initialised once");
        return -1;
    }
    self->fresh = PyList_New(0);
    self->retired = PyList_New(0);
    if (self->fresh == NULL || self->retired == NULL)
        return -1;
    self->active = Py_NewRef(active);
    self->slow = Py_NewRef(slow);
    self->clock = Py_NewRef(clock);
    self->dispatch = Py_NewRef(Py_None);
    self->wake = Py_NewRef(Py_None);
    self->rate = rate;
    self->fails = fails;
    self->cap = cap;
    self->cap_bytes = cap_bytes;
    self->wake_bytes = wake_bytes;
    self->rng = seed ? (uint64_t)seed : 0x9E3779B97F4A7C15ULL;
    return 0;
}

static int Recorder_traverse(Recorder *self, visitproc visit, void *arg) {
    Py_VISIT(self->active); Py_VISIT(self->slow); Py_VISIT(self->clock);
    Py_VISIT(self->dispatch); Py_VISIT(self->wake); Py_VISIT(self->fresh);
    Py_VISIT(self->retired); Py_VISIT(self->last_p);
    return 0;
}

static int Recorder_clear(Recorder *self) {
    Py_CLEAR(self->active); Py_CLEAR(self->slow); Py_CLEAR(self->clock);
    Py_CLEAR(self->dispatch); Py_CLEAR(self->wake); Py_CLEAR(self->fresh);
    Py_CLEAR(self->retired); Py_CLEAR(self->last_p);
    return 0;
}

static void Recorder_dealloc(Recorder *self) {
    PyObject_GC_UnTrack(self);
    Recorder_clear(self);
    PyMem_RawFree(self->buf);
    PyMem_RawFree(self->spare);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef Recorder_methods[] = {
    {"record", (PyCFunction)(void (*)(void))Recorder_record, METH_FASTCALL,
     "record(buf, start, end, answer): the server's tap, after `answer` went out"},
    {"append", (PyCFunction)(void (*)(void))Recorder_append, METH_FASTCALL,
     "append(kind, rows, predictor, time, answer, extra): one message, as the tap decided"},
    {"send", (PyCFunction)Recorder_send, METH_O,
     "send(message) -> bool: a message of another kind; False when full"},
    {"take", (PyCFunction)Recorder_take, METH_NOARGS,
     "take() -> (bytearray, answers, [(token, predictor)], [predictor])"},
    {"waiting", (PyCFunction)Recorder_waiting, METH_NOARGS, "answers recorded, not taken"},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef Recorder_members[] = {
    {"dispatch", T_OBJECT_EX, offsetof(Recorder, dispatch), 0, "the dispatcher (its parsed)"},
    {"wake", T_OBJECT_EX, offsetof(Recorder, wake), 0, "None or a callable"},
    {"backlog", T_PYSSIZET, offsetof(Recorder, backlog), 0, "bytes taken, not handed over"},
    {"dropped", T_PYSSIZET, offsetof(Recorder, dropped), 0, "answers not recorded: full"},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject RecorderType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "agent._tapfast.Recorder",
    .tp_doc = "The prediction log tap's buffer, and its usual answer's path (agent/_tapfast.c)",
    .tp_basicsize = sizeof(Recorder),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Recorder_init,
    .tp_dealloc = (destructor)Recorder_dealloc,
    .tp_traverse = (traverseproc)Recorder_traverse,
    .tp_clear = (inquiry)Recorder_clear,
    .tp_methods = Recorder_methods,
    .tp_members = Recorder_members,
};

static struct PyModuleDef tapfast_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_tapfast",
    .m_doc = "The prediction log tap's usual answer, in C (see agent/_tapfast.c).",
    .m_size = -1,
};

PyMODINIT_FUNC PyInit__tapfast(void) {
    if (PyType_Ready(&RecorderType) < 0)
        return NULL;
    parsed_name = PyUnicode_InternFromString("parsed");
    if (parsed_name == NULL)
        return NULL;
    PyObject *m = PyModule_Create(&tapfast_module);
    if (m == NULL)
        return NULL;
    PyObject *layout = Py_BuildValue("{s:i,s:i,s:i,s:i,s:i,s:i,s:i}", "magic_byte", MAGIC_BYTE,
                                     "result_type", RESULT_TYPE, "fail", DECISION_FAIL,
                                     "result_off", RESULT_OFF, "msg_size", MSG_SIZE,
                                     "binary_one", BINARY_ONE, "json_one", JSON_ONE);
    if (layout == NULL || PyModule_AddObject(m, "LAYOUT", layout) < 0) {
        Py_XDECREF(layout);
        Py_DECREF(m);
        return NULL;
    }
    Py_INCREF(&RecorderType);
    if (PyModule_AddObject(m, "Recorder", (PyObject *)&RecorderType) < 0) {
        Py_DECREF(&RecorderType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
