/*
 * agent._jsonfloats: read a JSON array of numbers and nulls straight into a float32 buffer.
 *
 * Why it exists: a JSON predict request carries 512 numbers, and CPython's json module turns
 * each into a Python float (a substring, a conversion and an object per number) before numpy
 * copies them out again: ~35 us of a ~60 us request, more than the model itself. This reads
 * the same text into the caller's float32 array in a few microseconds, with no Python objects.
 *
 * Contract (agent/jsonfast.py is the only caller):
 *   parse_array(data, pos, out) -> int
 *     data  a bytes-like object holding UTF-8 JSON text
 *     pos   index of the '[' that opens the array
 *     out   a writable, C-contiguous float32 buffer of n elements
 *   Returns the index just past the closing ']' when the array is exactly n JSON numbers or
 *   nulls (null -> NaN), written to out[0..n). Returns -1 for anything else: another kind of
 *   value, a number that is not valid JSON, the wrong count, text cut short. The caller then
 *   parses the line with the json module, which names what is wrong. It never raises for
 *   anything in `data`; it raises for arguments of the wrong kind (TypeError, BufferError)
 *   and on a failed allocation (MemoryError).
 *
 * The values are bit-for-bit what json.loads followed by numpy's float32 conversion gives:
 *   - JSON's number grammar exactly: -?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?,
 *     whitespace only as JSON allows it (space, tab, CR, LF);
 *   - every number becomes the correctly rounded double first (json.loads: a float through
 *     PyOS_string_to_double, an int through the correctly rounded int -> float conversion
 *     numpy uses), then a float32 by round-to-nearest-even, as numpy's cast does;
 *   - the double comes from Clinger's exact fast path (an integer mantissa below 2^53 scaled
 *     by an exactly representable power of ten is one correctly rounded IEEE operation), or
 *     otherwise from PyOS_string_to_double on the token, CPython's own correctly rounded
 *     conversion; "-0" is an int in JSON, so it reads as +0.0 as json.loads' 0 does.
 * Every read is bounds-checked against the buffer's length; the text is never written.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <float.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

static const double POW10[] = {
    1e0,  1e1,  1e2,  1e3,  1e4,  1e5,  1e6,  1e7,  1e8,  1e9,  1e10, 1e11,
    1e12, 1e13, 1e14, 1e15, 1e16, 1e17, 1e18, 1e19, 1e20, 1e21, 1e22,
};
#define MAX_EXACT_POW10 22
#define MAX_EXACT_MANTISSA (UINT64_C(1) << 53)
#define MAX_MANTISSA_DIGITS 19 /* 10^19 - 1 < 2^64 */
#define SHORT_TOKEN 64

/* float32 rounding of a double without the undefined behaviour C gives an out-of-range cast:
   at or beyond FLT_MAX + half an ulp (0x1.ffffffp+127) round-to-nearest-even gives infinity. */
static float
to_float32(double d)
{
    static const double overflow = 0x1.ffffffp+127;
    if (d >= overflow) {
        return INFINITY;
    }
    if (d <= -overflow) {
        return -INFINITY;
    }
    return (float)d;
}

static int
is_digit(char c)
{
    return c >= '0' && c <= '9';
}

static int
is_ws(char c)
{
    return c == ' ' || c == '\t' || c == '\n' || c == '\r';
}

/* CPython's correctly rounded conversion of one validated token; -1 with an exception set on
   failure (only memory errors: the token is known to be a valid number). */
static int
slow_double(const char *s, Py_ssize_t len, double *out)
{
    char small[SHORT_TOKEN];
    char *buf = small;
    if (len >= SHORT_TOKEN) {
        buf = PyMem_Malloc((size_t)len + 1);
        if (buf == NULL) {
            PyErr_NoMemory();
            return -1;
        }
    }
    memcpy(buf, s, (size_t)len);
    buf[len] = '\0';
    /* NULL overflow exception: out-of-range values become +-inf, as float() gives for 1e999 */
    double d = PyOS_string_to_double(buf, NULL, NULL);
    if (buf != small) {
        PyMem_Free(buf);
    }
    if (d == -1.0 && PyErr_Occurred()) {
        return -1;
    }
    *out = d;
    return 0;
}

/* One JSON number starting at s[*pos]. 0: parsed, *out set, *pos just past it; 1: not a valid
   JSON number here; -1: Python error set. */
static int
parse_number(const char *s, Py_ssize_t len, Py_ssize_t *pos, double *out)
{
    Py_ssize_t i = *pos;
    const Py_ssize_t start = i;
    int negative = 0, is_int = 1, inexact = 0, digits = 0;
    uint64_t mantissa = 0;
    long exp10 = 0;

    if (i < len && s[i] == '-') {
        negative = 1;
        i++;
    }
    if (i >= len || !is_digit(s[i])) {
        return 1;
    }
    if (s[i] == '0') {
        i++; /* JSON allows no other digit after a leading zero: the caller's delimiter check
                refuses "01" */
    }
    else {
        for (; i < len && is_digit(s[i]); i++) {
            if (digits < MAX_MANTISSA_DIGITS) {
                mantissa = mantissa * 10 + (uint64_t)(s[i] - '0');
                digits++;
            }
            else {
                inexact = 1;
            }
        }
    }
    if (i < len && s[i] == '.') {
        is_int = 0;
        i++;
        if (i >= len || !is_digit(s[i])) {
            return 1;
        }
        for (; i < len && is_digit(s[i]); i++) {
            if (digits < MAX_MANTISSA_DIGITS) {
                mantissa = mantissa * 10 + (uint64_t)(s[i] - '0');
                if (mantissa != 0) {
                    digits++; /* leading zeros of 0.000123 are not significant */
                }
                exp10--;
            }
            else {
                inexact = 1;
            }
        }
    }
    if (i < len && (s[i] == 'e' || s[i] == 'E')) {
        is_int = 0;
        i++;
        int exp_negative = 0;
        if (i < len && (s[i] == '+' || s[i] == '-')) {
            exp_negative = s[i] == '-';
            i++;
        }
        if (i >= len || !is_digit(s[i])) {
            return 1;
        }
        long e = 0;
        for (; i < len && is_digit(s[i]); i++) {
            if (e < 100000) { /* saturate: such exponents go to the slow path anyway */
                e = e * 10 + (s[i] - '0');
            }
        }
        exp10 += exp_negative ? -e : e;
    }
    *pos = i;

    if (is_int && !inexact) {
        /* an int: json.loads makes a Python int, whose float conversion is correctly rounded;
           so is a uint64 -> double conversion. -0 is the int 0. */
        double d = (double)mantissa;
        *out = negative ? -d : d;
        if (mantissa == 0) {
            *out = 0.0;
        }
        return 0;
    }
    if (!inexact && mantissa <= MAX_EXACT_MANTISSA && exp10 >= -MAX_EXACT_POW10 &&
        exp10 <= MAX_EXACT_POW10) {
        double d = (double)mantissa;
        d = exp10 < 0 ? d / POW10[-exp10] : d * POW10[exp10];
        *out = negative ? -d : d;
        return 0;
    }
    return slow_double(s + start, i - start, out) < 0 ? -1 : 0;
}

static PyObject *
parse_array(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *data_obj, *out_obj;
    Py_ssize_t pos;
    if (!PyArg_ParseTuple(args, "OnO:parse_array", &data_obj, &pos, &out_obj)) {
        return NULL;
    }
    Py_buffer data, out;
    if (PyObject_GetBuffer(data_obj, &data, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    if (PyObject_GetBuffer(out_obj, &out, PyBUF_WRITABLE | PyBUF_FORMAT | PyBUF_C_CONTIGUOUS) <
        0) {
        PyBuffer_Release(&data);
        return NULL;
    }
    Py_ssize_t result = -1;
    int failed = 0;
    if (out.itemsize != (Py_ssize_t)sizeof(float) || out.format == NULL ||
        (strcmp(out.format, "f") != 0 && strcmp(out.format, "<f") != 0 &&
         strcmp(out.format, "=f") != 0)) {
        PyErr_SetString(PyExc_TypeError, "parse_array: out must be a float32 buffer");
        failed = 1;
        goto done;
    }

    const char *s = (const char *)data.buf;
    const Py_ssize_t len = data.len, n = out.len / (Py_ssize_t)sizeof(float);
    float *dst = (float *)out.buf;
    Py_ssize_t i = pos, k = 0;
    if (i < 0 || i >= len || s[i] != '[') {
        goto done;
    }
    i++;
    while (i < len && is_ws(s[i])) {
        i++;
    }
    if (i < len && s[i] == ']') {
        if (n == 0) {
            result = i + 1;
        }
        goto done;
    }
    for (;;) {
        while (i < len && is_ws(s[i])) {
            i++;
        }
        if (k >= n || i >= len) {
            goto done;
        }
        if (s[i] == 'n') {
            if (len - i < 4 || memcmp(s + i, "null", 4) != 0) {
                goto done;
            }
            dst[k++] = NAN;
            i += 4;
        }
        else {
            double d;
            int rc = parse_number(s, len, &i, &d);
            if (rc < 0) {
                failed = 1;
                goto done;
            }
            if (rc > 0) {
                goto done;
            }
            dst[k++] = to_float32(d);
        }
        while (i < len && is_ws(s[i])) {
            i++;
        }
        if (i >= len) {
            goto done;
        }
        if (s[i] == ',') {
            i++;
            continue;
        }
        if (s[i] == ']' && k == n) {
            result = i + 1;
        }
        goto done;
    }

done:
    PyBuffer_Release(&out);
    PyBuffer_Release(&data);
    if (failed) {
        return NULL;
    }
    return PyLong_FromSsize_t(result);
}

static PyMethodDef methods[] = {
    {"parse_array", parse_array, METH_VARARGS,
     "parse_array(data, pos, out) -> int\n\n"
     "Read the JSON array opening at data[pos] into the float32 buffer out (null -> NaN).\n"
     "Returns the index past its ']' when it holds exactly len(out) numbers or nulls,\n"
     "else -1 (the caller falls back to the json module, which names the problem)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "agent._jsonfloats",
    .m_doc = "JSON number arrays straight into float32 buffers (see agent/jsonfast.py).",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC
PyInit__jsonfloats(void)
{
    return PyModule_Create(&module);
}
