/* The shared-memory rings' hot path in C: a send's copy in, a receive's copy out, the doorbell, the poll and the sleep.

   pipeline/runtime/shm.py holds the layout and the whole protocol; this module only does its common
   steps in fewer instructions. A rank that has just computed runs cold: every Python step of a send
   costs microseconds there (benchmarks/latency.py), and one call into C replaces twenty of them.
   shm.py falls back to its own Python code, byte for byte the same protocol, when this module was not
   built (no C compiler at install) or PIPELINE_SHM_NATIVE=0.

   A channel's control block (at `control`): write_pos (u64) at +0, read_pos (u64) at +64; the ring of
   `capacity` bytes (whole pages) holds records of a 64-byte header (tag, nbytes: u64 each) and the
   payload padded to 64. Positions count bytes ever written or read; one writer per word. The payload is
   stored before write_pos (release), and read after it (acquire). */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <limits.h>
#include <linux/futex.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define HEADER 64
#define READ_POS 8 /* read_pos's index in u64 words from write_pos: its own cache line */

static int addresses(PyObject *const *args, Py_ssize_t nargs, Py_ssize_t expected, uint64_t *out) {
    if (nargs != expected) {
        PyErr_Format(PyExc_TypeError, "expected %zd integer arguments, got %zd", expected, nargs);
        return -1;
    }
    for (Py_ssize_t i = 0; i < nargs; i++) {
        out[i] = PyLong_AsUnsignedLongLong(args[i]);
        if (out[i] == (uint64_t)-1 && PyErr_Occurred())
            return -1;
    }
    return 0;
}

static uint64_t record_bytes(uint64_t nbytes) { return HEADER + (nbytes + HEADER - 1) / HEADER * HEADER; }

/* Copy n bytes between `outside` and the ring at byte position `at` (< capacity), wrapping at the end. */
static void copy(char *ring, uint64_t capacity, uint64_t at, char *outside, uint64_t n, int into_ring) {
    uint64_t first = n < capacity - at ? n : capacity - at;
    if (into_ring) {
        memcpy(ring + at, outside, first);
        memcpy(ring, outside + first, n - first);
    } else {
        memcpy(outside, ring + at, first);
        memcpy(outside + first, ring, n - first);
    }
}

/* head(ring, capacity, control) -> (tag, nbytes) of the record at the read position once all of it has
   arrived, else None. */
static PyObject *head(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    uint64_t a[3];
    if (addresses(args, nargs, 3, a) < 0)
        return NULL;
    uint64_t *write_pos = (uint64_t *)a[2];
    uint64_t read = write_pos[READ_POS], arrived = __atomic_load_n(write_pos, __ATOMIC_ACQUIRE) - read;
    if (arrived < HEADER)
        Py_RETURN_NONE;
    uint64_t *header = (uint64_t *)((char *)a[0] + read % a[1]);
    if (arrived < record_bytes(header[1]))
        Py_RETURN_NONE;
    return Py_BuildValue("(KK)", (unsigned long long)header[0], (unsigned long long)header[1]);
}

/* take(ring, capacity, control, dst, nbytes): copy the complete record at the read position (of nbytes,
   as head said) into dst and move past it. */
static PyObject *take(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    uint64_t a[5];
    if (addresses(args, nargs, 5, a) < 0)
        return NULL;
    uint64_t capacity = a[1], nbytes = a[4];
    uint64_t *write_pos = (uint64_t *)a[2], *read_pos = write_pos + READ_POS;
    uint64_t read = *read_pos;
    copy((char *)a[0], capacity, (read + HEADER) % capacity, (char *)a[3], nbytes, 0);
    __atomic_store_n(read_pos, read + record_bytes(nbytes), __ATOMIC_RELEASE);
    Py_RETURN_NONE;
}

/* The doorbell's u32 at `bell`, and beside it (bell + 4) `sleeping`, written by the segment's owner only:
   1 while it sleeps on the doorbell, or for good when its rank runs the Python path, which cannot order
   its own flag against its look (so it is always woken). Both sides store, fence, then load (Dekker):
   a sender that reads 0 there is one whose doorbell the sleeper sees changed before it sleeps. */

static double now_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

/* wait_take(ring, capacity, control, tag, dst, nbytes, seconds) -> int: wait at most `seconds` for the
   record at the read position to be whole; if it is message `tag` of nbytes, copy it into dst and move
   past it (1); if it is another (0, nothing read: Python reads it), or none came in time (-1). The GIL is
   let go meanwhile: the receive of a message the peer is about to send, in one call. */
static PyObject *wait_take(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 7) {
        PyErr_SetString(PyExc_TypeError, "wait_take(ring, capacity, control, tag, dst, nbytes, seconds)");
        return NULL;
    }
    uint64_t a[6];
    if (addresses(args, 6, 6, a) < 0)
        return NULL;
    double seconds = PyFloat_AsDouble(args[6]);
    if (PyErr_Occurred())
        return NULL;
    char *ring = (char *)a[0];
    uint64_t capacity = a[1], tag = a[3], nbytes = a[5];
    uint64_t *write_pos = (uint64_t *)a[2], *read_pos = write_pos + READ_POS;
    int got = -1;
    Py_BEGIN_ALLOW_THREADS
    double deadline = now_s() + seconds;
    uint64_t read = *read_pos;
    for (unsigned i = 0;; i++) {
        uint64_t arrived = __atomic_load_n(write_pos, __ATOMIC_ACQUIRE) - read;
        if (arrived >= HEADER) {
            uint64_t *header = (uint64_t *)(ring + read % capacity);
            if (header[0] != tag || header[1] != nbytes) {
                got = 0;
                break;
            }
            if (arrived >= record_bytes(nbytes)) {
                copy(ring, capacity, (read + HEADER) % capacity, (char *)a[4], nbytes, 0);
                __atomic_store_n(read_pos, read + record_bytes(nbytes), __ATOMIC_RELEASE);
                got = 1;
                break;
            }
        }
        if ((i & 63) == 0 && now_s() >= deadline)
            break;
    }
    Py_END_ALLOW_THREADS
    return PyLong_FromLong(got);
}

static void ring_bell(uint32_t *bell, uint32_t value) {
    uint32_t *sleeping = bell + 1;
    __atomic_store_n(bell, value, __ATOMIC_SEQ_CST);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    if (__atomic_load_n(sleeping, __ATOMIC_SEQ_CST))
        syscall(SYS_futex, bell, FUTEX_WAKE, INT_MAX, NULL, NULL, 0);
}

/* ring(bell, value): write the doorbell; wake its owner if it sleeps (a system call only then). */
static PyObject *ring(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    uint64_t a[2];
    if (addresses(args, nargs, 2, a) < 0)
        return NULL;
    ring_bell((uint32_t *)a[0], (uint32_t)a[1]);
    Py_RETURN_NONE;
}

/* put(ring, capacity, control, tag, src, nbytes, bell, value) -> bool: the whole message as one record if
   it fits now, then the receiver's doorbell rung with `value`; False (nothing written) if it does not fit. */
static PyObject *put(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    uint64_t a[8];
    if (addresses(args, nargs, 8, a) < 0)
        return NULL;
    char *ring = (char *)a[0];
    uint64_t capacity = a[1], tag = a[3], nbytes = a[5];
    uint64_t *write_pos = (uint64_t *)a[2], *read_pos = write_pos + READ_POS;
    uint64_t written = *write_pos, record = record_bytes(nbytes);
    if (capacity - (written - __atomic_load_n(read_pos, __ATOMIC_ACQUIRE)) < record)
        Py_RETURN_FALSE;
    uint64_t start = written % capacity; /* 64-aligned in a ring of whole pages: the header never wraps */
    uint64_t *header = (uint64_t *)(ring + start);
    header[0] = tag;
    header[1] = nbytes;
    copy(ring, capacity, (start + HEADER) % capacity, (char *)a[4], nbytes, 1);
    __atomic_store_n(write_pos, written + record, __ATOMIC_RELEASE);
    ring_bell((uint32_t *)a[6], (uint32_t)a[7]);
    Py_RETURN_TRUE;
}

/* sleep(bell, expected, seconds): sleep on the doorbell while it reads `expected`, at most `seconds`
   (less on a wake or a signal), the GIL let go meanwhile. */
static PyObject *sleep_on(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "sleep(bell, expected, seconds)");
        return NULL;
    }
    uint32_t *bell = (uint32_t *)PyLong_AsUnsignedLongLong(args[0]), *sleeping = bell + 1;
    uint32_t expected = (uint32_t)PyLong_AsUnsignedLong(args[1]);
    double seconds = PyFloat_AsDouble(args[2]);
    if (PyErr_Occurred())
        return NULL;
    if (seconds < 0)
        seconds = 0;
    struct timespec timeout = {(time_t)seconds, (long)((seconds - (double)(time_t)seconds) * 1e9)};
    Py_BEGIN_ALLOW_THREADS
    __atomic_store_n(sleeping, 1, __ATOMIC_SEQ_CST);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    if (__atomic_load_n(bell, __ATOMIC_SEQ_CST) == expected)
        syscall(SYS_futex, bell, FUTEX_WAIT, expected, &timeout, NULL, 0);
    __atomic_store_n(sleeping, 0, __ATOMIC_SEQ_CST);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}


/* spin(bell, expected, seconds) -> bool: poll the doorbell until it differs from `expected` (True) or
   `seconds` have passed (False), the GIL let go meanwhile. */
static PyObject *spin(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "spin(bell, expected, seconds)");
        return NULL;
    }
    uint32_t *bell = (uint32_t *)PyLong_AsUnsignedLongLong(args[0]);
    uint32_t expected = (uint32_t)PyLong_AsUnsignedLong(args[1]);
    double seconds = PyFloat_AsDouble(args[2]);
    if (PyErr_Occurred())
        return NULL;
    int rang = 0;
    Py_BEGIN_ALLOW_THREADS
    double deadline = now_s() + seconds;
    for (unsigned i = 0;; i++) {
        if (__atomic_load_n(bell, __ATOMIC_ACQUIRE) != expected) {
            rang = 1;
            break;
        }
        if ((i & 63) == 0 && now_s() >= deadline)
            break;
#if defined(__x86_64__) || defined(__i386__)
        /* no pause instruction: under KVM a run of them is taken for a spinning lock and exits to the host */
#endif
    }
    Py_END_ALLOW_THREADS
    return PyBool_FromLong(rang);
}

static PyMethodDef methods[] = {
    {"put", (PyCFunction)(void (*)(void))put, METH_FASTCALL, "Write a whole message into a ring if it fits, and ring."},
    {"head", (PyCFunction)(void (*)(void))head, METH_FASTCALL, "(tag, nbytes) of a complete record, or None."},
    {"take", (PyCFunction)(void (*)(void))take, METH_FASTCALL, "Copy a complete record out of a ring."},
    {"ring", (PyCFunction)(void (*)(void))ring, METH_FASTCALL, "Write a doorbell and wake its sleeper."},
    {"sleep", (PyCFunction)(void (*)(void))sleep_on, METH_FASTCALL, "Sleep on a doorbell."},
    {"wait_take", (PyCFunction)(void (*)(void))wait_take, METH_FASTCALL, "Wait for one message and copy it out."},
    {"spin", (PyCFunction)(void (*)(void))spin, METH_FASTCALL, "Poll a doorbell for a while."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_ring", "The shared-memory rings' hot path.", -1, methods};

PyMODINIT_FUNC PyInit__ring(void) { return PyModule_Create(&module); }
