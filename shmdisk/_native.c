/* shmdisk._native: the common read and write request in one call.
 *
 * This is an accelerator, not a second design: it runs exactly the protocol that
 * shmdisk/_pageio.py describes (stripes of robust mutexes, intents, SEQ counters made odd and
 * even around every change, lock-free reads that re-check the counters), on the byte format
 * of shmdisk/_layout.py. Python keeps everything else (allocation on first write, discard,
 * resize, waiting) and drives the same lock table through the Engine methods below, so
 * processes with and without this module share a disk.
 *
 * Every entry point checks its arguments and every offset it derives from the (shared, hence
 * untrusted) segment against the lengths of the buffers it was given: bad input raises a Python
 * exception or returns ST_SLOW/ST_RANGE for Python to sort out, never touches memory outside
 * the mappings. The GIL is released only around memcpy/memset and around blocking on a mutex.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>
#include <xmmintrin.h>

#if !defined(__x86_64__) || !defined(__GLIBC__)
#error "shmdisk._native is built for glibc on x86-64 only (see shmdisk/_stripes.py)"
#endif

#ifndef FALLOC_FL_KEEP_SIZE
#define FALLOC_FL_KEEP_SIZE 0x01
#endif
#ifndef FALLOC_FL_PUNCH_HOLE
#define FALLOC_FL_PUNCH_HOLE 0x02
#endif

/* The byte format (shmdisk/_layout.py); _stripes.py checks these against it at import. */
#define F_SIZE_SECTORS 5
#define F_DESTROYED 9
#define F_FROZEN 21
#define STRIPES 1024
#define STRIPE_SHIFT 4
#define SLOT_SIZE 64
#define INTENT_FIRST 40
#define INTENT_COUNT 48
#define LOCK_OFFSET 4096
#define MAP_OFFSET (LOCK_OFFSET + STRIPES * SLOT_SIZE)
#define MAP_PAGE_SHIFT 10 /* page-map words per OS page of the map: 1024 */
#define MAPPED 0x80000000u
#define ZEROED 0x40000000u
#define FLAGS (MAPPED | ZEROED)
#define SEQ_MASK 0x3FFFFFFFu
#define MAX_CHAIN 16

/* What read() and write() return. */
enum {
    ST_OK = 0,
    ST_SLOW = 1,      /* Python must do it: a writer is there, a page needs memory, ... */
    ST_RANGE = 2,     /* outside the disk or past this mapping: Python re-checks and raises */
    ST_GONE = 3,      /* the disk was destroyed */
    ST_READONLY = 4,  /* frozen disk (or read-only handle, for write) */
    ST_BASE_GONE = 5, /* a backing disk of this overlay was destroyed */
};

#define GIL_FREE_BYTES (64 * 1024) /* copies this big run without the GIL */
#define MAX_BUFFERS 16             /* more buffers in one request: Python does it */
#define LOCAL_PAGES 64             /* requests up to this many pages need no allocation */

static unsigned long long repaired_pages = 0;

/* Stripes this thread took through the Engine methods, i.e. Python's holding() (slow paths,
 * hold_writes, resize). The one-call write takes stripes only while this is 0, as the python
 * engine's one-page write does: a thread that holds stripes already may be re-entering from a
 * signal handler, or be near the kernel's robust-list limit, and only Python's holding()
 * checks those. Without this, a thread holding two disks' 2048 stripes took a 2049th here,
 * which the kernel would not free if the thread died. The child of a fork holds none. */
static __thread unsigned long held_here = 0;

static void forget_after_fork(void) { held_here = 0; }

typedef struct EngineObject {
    PyObject_HEAD
    Py_buffer meta; /* header | lock table | page map */
    Py_buffer data; /* the data area (len 0: capacity 0) */
    Py_buffer known; /* one byte per page of the page map: known to hold memory */
    int have_meta, have_data, have_known;
    int writable;
    int fd;
    uint64_t sector_size, page_shift, max_pages, data_offset;
    uint64_t base_pages; /* pages of this disk that may come from the base */
    struct EngineObject *base;
} EngineObject;

/* ------------------------------------------------------------------ small helpers */

static inline uint64_t *hdr(EngineObject *e) { return (uint64_t *)e->meta.buf; }

static inline uint64_t hdr_load(EngineObject *e, int field) {
    return __atomic_load_n(&hdr(e)[field], __ATOMIC_ACQUIRE);
}

static inline uint32_t *words(EngineObject *e) {
    return (uint32_t *)((char *)e->meta.buf + MAP_OFFSET);
}

static inline char *slot(EngineObject *e, uint64_t s) {
    return (char *)e->meta.buf + LOCK_OFFSET + s * SLOT_SIZE;
}

static inline pthread_mutex_t *mutex_of(EngineObject *e, uint64_t s) {
    return (pthread_mutex_t *)slot(e, s);
}

static inline uint64_t stripe_of(uint64_t page) { return (page >> STRIPE_SHIFT) % STRIPES; }

/* Page `p`'s word, without reading a hole of the page map through the mapping (that would
 * make tmpfs allocate it). A hole was never written: its words are 0. Learns into `known`
 * which map pages hold memory (they never stop holding it: the map is never punched). */
static uint32_t load_word(EngineObject *e, uint64_t p) {
    uint64_t g = p >> MAP_PAGE_SHIFT;
    unsigned char *known = (unsigned char *)e->known.buf;
    if (!known[g]) {
        off_t off = (off_t)(MAP_OFFSET + (g << 12));
        off_t got = lseek(e->fd, off, SEEK_DATA);
        if (got != off)
            return 0; /* a hole (or ENXIO: no data after it) */
        known[g] = 1;
    }
    return __atomic_load_n(&words(e)[p], __ATOMIC_ACQUIRE);
}

static inline void store_word(EngineObject *e, uint64_t p, uint32_t w) {
    __atomic_store_n(&words(e)[p], w, __ATOMIC_RELEASE);
}

/* Is any disk of the chain under `e` (the backing disks, not `e` itself) destroyed? */
static int base_gone(EngineObject *e) {
    for (EngineObject *b = e->base; b; b = b->base)
        if (hdr_load(b, F_DESTROYED))
            return 1;
    return 0;
}

/* The checks every request starts with: ST_OK, or why not. */
static int check_request(EngineObject *e, long long off, uint64_t total, int writing) {
    if (hdr_load(e, F_DESTROYED))
        return ST_GONE;
    if (e->base && base_gone(e))
        return ST_BASE_GONE;
    if (writing && (!e->writable || hdr_load(e, F_FROZEN)))
        return ST_READONLY;
    uint64_t size = hdr_load(e, F_SIZE_SECTORS);
    uint64_t limit = e->max_pages << e->page_shift;
    if (size > limit / e->sector_size)
        return ST_RANGE; /* a corrupt size: Python validates the header and says so */
    uint64_t end_disk = size * e->sector_size;
    if (off < 0 || total > end_disk || (uint64_t)off > end_disk - total)
        return ST_RANGE;
    if ((uint64_t)off + total > (uint64_t)e->data.len)
        return ST_RANGE; /* grown by another process: Python maps the new capacity */
    return ST_OK;
}

/* ------------------------------------------------------------------ caller's buffers */

typedef struct {
    Py_buffer view[MAX_BUFFERS];
    int n;
    uint64_t total;
} Views;

static void release_views(Views *v) {
    for (int i = 0; i < v->n; i++)
        PyBuffer_Release(&v->view[i]);
    v->n = 0;
}

/* Plain numbers and bytes only: an object array ('O') filled with raw bytes is a crash
 * waiting for its next access. */
static int plain_format(const char *f) {
    if (f == NULL)
        return 1; /* NULL means 'B' */
    if (*f == '@' || *f == '=' || *f == '<' || *f == '>' || *f == '!')
        f++;
    if (*f == 'Z')
        return (f[1] == 'f' || f[1] == 'd' || f[1] == 'g') && f[2] == '\0';
    return *f != '\0' && strchr("cbB?hHiIlLqQnNefdg", *f) != NULL && f[1] == '\0';
}

/* 0 ok, 1 too many buffers (Python does it), -1 exception set. */
static int get_views(PyObject *obj, int writable, Views *v) {
    int flags = PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0);
    v->n = 0;
    v->total = 0;
    PyObject *seq = NULL;
    Py_ssize_t count = 1;
    if (PyList_Check(obj) || PyTuple_Check(obj)) {
        seq = obj;
        count = PySequence_Fast_GET_SIZE(obj);
        if (count > MAX_BUFFERS)
            return 1;
    }
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *item = seq ? PySequence_Fast_GET_ITEM(seq, i) : obj;
        if (PyObject_GetBuffer(item, &v->view[v->n], flags) < 0) {
            release_views(v);
            return -1;
        }
        v->n++;
        if (!plain_format(v->view[v->n - 1].format)) {
            release_views(v);
            PyErr_SetString(PyExc_TypeError, "buffer format is not plain bytes or numbers");
            return -1;
        }
        v->total += (uint64_t)v->view[v->n - 1].len;
    }
    return 0;
}

/* A position inside the concatenation of the caller's buffers. */
typedef struct {
    Views *v;
    int i;
    uint64_t at;
} Cursor;

/* Copy `len` bytes from `src` (NULL: zeros) to the cursor (reading), or from the cursor to
 * `dst` (writing, src unused). */
static void cursor_out(Cursor *c, const char *src, uint64_t len) {
    while (len) {
        Py_buffer *b = &c->v->view[c->i];
        uint64_t room = (uint64_t)b->len - c->at;
        if (room == 0) {
            c->i++;
            c->at = 0;
            continue;
        }
        uint64_t k = len < room ? len : room;
        char *dst = (char *)b->buf + c->at;
        if (src) {
            memcpy(dst, src, k);
            src += k;
        } else {
            memset(dst, 0, k);
        }
        c->at += k;
        len -= k;
    }
}

static void cursor_in(Cursor *c, char *dst, uint64_t len) {
    while (len) {
        Py_buffer *b = &c->v->view[c->i];
        uint64_t room = (uint64_t)b->len - c->at;
        if (room == 0) {
            c->i++;
            c->at = 0;
            continue;
        }
        uint64_t k = len < room ? len : room;
        memcpy(dst, (char *)b->buf + c->at, k);
        dst += k;
        c->at += k;
        len -= k;
    }
}

/* ------------------------------------------------------------------ stripes */

/* The stripes covering pages [p0, p1), ascending (the lock order): all of them, or the
 * residues of the units u0..u1, which may wrap around STRIPES once. */
typedef struct {
    uint64_t a0, a1, b0, b1; /* [a0, a1) then [b0, b1) */
} StripeSet;

static StripeSet stripes_for(uint64_t p0, uint64_t p1) {
    StripeSet s = {0, 0, 0, 0};
    uint64_t u0 = p0 >> STRIPE_SHIFT, u1 = (p1 - 1) >> STRIPE_SHIFT;
    if (u1 - u0 + 1 >= STRIPES) {
        s.a1 = STRIPES;
        return s;
    }
    uint64_t r0 = u0 % STRIPES, r1 = u1 % STRIPES;
    if (r0 <= r1) {
        s.a0 = r0;
        s.a1 = r1 + 1;
    } else {
        s.a1 = r1 + 1;
        s.b0 = r0;
        s.b1 = STRIPES;
    }
    return s;
}

/* Punch pages [p, p + n) out of the file: memory given back, zeros when read again. */
static void punch(EngineObject *e, uint64_t p, uint64_t n) {
    if (n == 0)
        return;
    off_t off = (off_t)(e->data_offset + (p << e->page_shift));
    (void)fallocate(e->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, off,
                    (off_t)(n << e->page_shift));
}

/* The first unit at or after page `pa` that belongs to stripe `s`. */
static uint64_t first_unit(uint64_t pa, uint64_t s) {
    uint64_t u = pa >> STRIPE_SHIFT;
    return u + (s + STRIPES - u % STRIPES) % STRIPES;
}

/* The next unit of stripe `s` at or after page *p, within [first, end), whose bytes hold
 * memory: 1, its pages in [*a, *b), and *p moved past it; or 0. Page q's bytes start at
 * base + (q << shift) (the data area, or with shift 2 the page map). Found with SEEK_DATA
 * alone, which skips holes at once: SEEK_HOLE walks every page of a dense run, and 1024 stripes
 * doing so from a dead holder's intent took over a second of CPU for a 128 MiB run. Mirrors
 * _units_with_memory in _pageio.py. */
static int next_unit(EngineObject *e, uint64_t base, uint64_t shift, uint64_t s, uint64_t first,
                     uint64_t end, uint64_t *p, uint64_t *a, uint64_t *b) {
    while (*p < end) {
        off_t d = lseek(e->fd, (off_t)(base + (*p << shift)), SEEK_DATA);
        if (d < 0)
            return 0; /* ENXIO: no memory at or after *p */
        uint64_t q = ((uint64_t)d - base) >> shift;
        if (q >= end)
            return 0;
        uint64_t u = first_unit(q, s); /* the unit of stripe s holding page q, or the next */
        uint64_t lo = u << STRIPE_SHIFT;
        if (lo < first)
            lo = first;
        if (lo >= end)
            return 0;
        if (lo > q) {
            *p = lo; /* the memory found belongs to another stripe: look again from ours */
            continue;
        }
        uint64_t hi = (u + 1) << STRIPE_SHIFT;
        *a = lo;
        *b = hi < end ? hi : end;
        *p = (u + STRIPES) << STRIPE_SHIFT;
        return 1;
    }
    return 0;
}

/* The holder of stripe `s` died: put right what it may have left, before anyone else gets
 * the stripe. For the pages of its intent that belong to `s`: an odd counter is made even;
 * a page that is not MAPPED is punched (a first write, discard or shrink cut short may have
 * left data or memory in it, and an unmapped page must read as zeros and cost nothing).
 * Only the parts of the file that hold memory are visited (SEEK_DATA), so an intent over a
 * huge, sparse disk is repaired as fast as a small one. Mirrors repair() in _pageio.py. */
static void repair(EngineObject *e, uint64_t s) {
    uint64_t first = *(volatile uint64_t *)(slot(e, s) + INTENT_FIRST);
    uint64_t count = *(volatile uint64_t *)(slot(e, s) + INTENT_COUNT);
    if (first >= e->max_pages || count == 0)
        return;
    if (count > e->max_pages - first)
        count = e->max_pages - first;
    uint64_t end = first + count;
    unsigned char *known = (unsigned char *)e->known.buf;
    uint64_t p, a, b;
    /* A unit (16 words) lies within one page of the map, so one flag of `known` covers it.
     * 1. Odd counters, in the units of stripe s whose words hold memory (4 bytes a page). */
    p = first;
    while (next_unit(e, MAP_OFFSET, 2, s, first, end, &p, &a, &b)) {
        known[a >> MAP_PAGE_SHIFT] = 1;
        for (uint64_t pg = a; pg < b; pg++) {
            uint32_t w = words(e)[pg];
            if (w & 1) {
                store_word(e, pg, (w & FLAGS) | ((w + 1) & SEQ_MASK));
                repaired_pages++;
            }
        }
    }
    /* 2. Memory of pages that are not mapped, in the units of stripe s that hold memory. */
    p = first;
    while (next_unit(e, e->data_offset, e->page_shift, s, first, end, &p, &a, &b)) {
        uint64_t run = 0;
        for (uint64_t pg = a; pg < b; pg++) {
            if (!(load_word(e, pg) & MAPPED)) {
                run++;
                continue;
            }
            punch(e, pg - run, run);
            run = 0;
        }
        punch(e, b - run, run);
    }
}

/* Take stripe `s` now or report EBUSY; a dead holder's mess is repaired first. */
static int try_stripe(EngineObject *e, uint64_t s) {
    pthread_mutex_t *m = mutex_of(e, s);
    int rc = pthread_mutex_trylock(m);
    if (rc == EOWNERDEAD) {
        repair(e, s);
        rc = pthread_mutex_consistent(m);
    }
    return rc;
}

static void unlock_range(EngineObject *e, uint64_t a, uint64_t b) {
    for (uint64_t s = a; s < b; s++)
        pthread_mutex_unlock(mutex_of(e, s));
}

static void unlock_set(EngineObject *e, StripeSet *ss) {
    unlock_range(e, ss->b0, ss->b1);
    unlock_range(e, ss->a0, ss->a1);
}

/* Take every stripe of the set or none: 0, EBUSY, or an errno (ENOTRECOVERABLE, ...). */
static int try_set(EngineObject *e, StripeSet *ss, uint64_t first, uint64_t count) {
    uint64_t ranges[2][2] = {{ss->a0, ss->a1}, {ss->b0, ss->b1}};
    for (int k = 0; k < 2; k++) {
        for (uint64_t s = ranges[k][0]; s < ranges[k][1]; s++) {
            int rc = try_stripe(e, s);
            if (rc) {
                unlock_range(e, ranges[k][0], s);
                if (k == 1)
                    unlock_range(e, ss->a0, ss->a1);
                return rc;
            }
            char *sl = slot(e, s);
            *(volatile uint64_t *)(sl + INTENT_FIRST) = first;
            *(volatile uint64_t *)(sl + INTENT_COUNT) = count;
        }
    }
    return 0;
}

/* ------------------------------------------------------------------ reading */

/* Where page `p` of `e` reads from: a pointer into some layer's data, NULL for zeros, or
 * sets *status (ST_SLOW, ST_BASE_GONE) and returns NULL. `w` is e's own word for p. */
static const char *page_source(EngineObject *e, uint64_t p, uint32_t w, int *status) {
    for (int depth = 0; depth <= MAX_CHAIN; depth++) {
        if (w & MAPPED) {
            uint64_t at = p << e->page_shift;
            if (at + (1ull << e->page_shift) > (uint64_t)e->data.len) {
                *status = ST_SLOW; /* this layer grew past its mapping */
                return NULL;
            }
            return (const char *)e->data.buf + at;
        }
        if ((w & ZEROED) || !e->base || p >= e->base_pages)
            return NULL;
        e = e->base;
        if (hdr_load(e, F_DESTROYED)) {
            *status = ST_BASE_GONE;
            return NULL;
        }
        w = load_word(e, p); /* a frozen disk's words never change */
        if (w & 1) {
            *status = ST_SLOW;
            return NULL;
        }
    }
    *status = ST_SLOW;
    return NULL;
}

static int do_read(EngineObject *e, long long off, Views *v) {
    uint64_t total = v->total;
    int st = check_request(e, off, total, 0);
    if (st != ST_OK || total == 0)
        return st;
    uint64_t shift = e->page_shift, page = 1ull << shift;
    uint64_t p0 = (uint64_t)off >> shift, p1 = (((uint64_t)off + total - 1) >> shift) + 1;
    uint64_t n = p1 - p0;
    uint32_t snap_local[LOCAL_PAGES];
    const char *src_local[LOCAL_PAGES];
    uint32_t *snap = snap_local;
    const char **src = src_local;
    if (n > LOCAL_PAGES) {
        snap = PyMem_Malloc(n * sizeof(uint32_t));
        src = PyMem_Malloc(n * sizeof(char *));
        if (!snap || !src) {
            PyMem_Free(snap);
            PyMem_Free(src);
            PyErr_NoMemory();
            return -1;
        }
    }
    st = ST_SLOW;
    for (int attempt = 0; attempt < 2; attempt++) {
        int bad = ST_OK;
        for (uint64_t i = 0; i < n && bad == ST_OK; i++) {
            uint32_t w = load_word(e, p0 + i);
            snap[i] = w;
            if (w & 1)
                bad = ST_SLOW; /* a writer is in there: Python waits for it */
            else
                src[i] = page_source(e, p0 + i, w, &bad);
        }
        if (bad != ST_OK) {
            st = bad;
            break;
        }
        /* Copy page by page from its source, merging neighbours that are contiguous. */
        Cursor c = {v, 0, 0};
        int nogil = total >= GIL_FREE_BYTES;
        PyThreadState *ts = nogil ? PyEval_SaveThread() : NULL;
        uint64_t pos = (uint64_t)off, end = (uint64_t)off + total;
        uint64_t i = 0;
        while (pos < end) {
            uint64_t j = i + 1;
            while (j < n && ((src[i] == NULL && src[j] == NULL) ||
                             (src[i] && src[j] == src[i] + ((j - i) << shift))))
                j++;
            uint64_t run_end = (p0 + j) << shift;
            if (run_end > end)
                run_end = end;
            uint64_t k = run_end - pos;
            cursor_out(&c, src[i] ? src[i] + (pos & (page - 1)) : NULL, k);
            pos = run_end;
            i = j;
        }
        if (ts)
            PyEval_RestoreThread(ts);
        __atomic_thread_fence(__ATOMIC_ACQUIRE); /* the data loads before the re-check */
        int same = 1;
        for (uint64_t i2 = 0; i2 < n; i2++)
            if (load_word(e, p0 + i2) != snap[i2]) {
                same = 0;
                break;
            }
        if (same) {
            st = ST_OK;
            break;
        }
    }
    if (snap != snap_local) {
        PyMem_Free(snap);
        PyMem_Free((void *)src);
    }
    return st;
}

/* ------------------------------------------------------------------ writing */

static int do_write(EngineObject *e, long long off, Views *v) {
    uint64_t total = v->total;
    int st = check_request(e, off, total, 1);
    if (st != ST_OK || total == 0)
        return st;
    uint64_t shift = e->page_shift;
    uint64_t p0 = (uint64_t)off >> shift, p1 = (((uint64_t)off + total - 1) >> shift) + 1;
    uint64_t n = p1 - p0;
    /* Known map pages only: a hole means an unmapped page, which Python allocates. */
    unsigned char *known = (unsigned char *)e->known.buf;
    for (uint64_t g = p0 >> MAP_PAGE_SHIFT; g <= (p1 - 1) >> MAP_PAGE_SHIFT; g++)
        if (!known[g])
            return ST_SLOW;
    if (held_here)
        return ST_SLOW; /* this thread holds stripes already: Python checks (see held_here) */
    StripeSet ss = stripes_for(p0, p1);
    int rc = try_set(e, &ss, p0, n);
    if (rc == EBUSY)
        return ST_SLOW;
    if (rc) {
        errno = rc;
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    /* Again under the stripes: a destroy, freeze or resize may have come in between. */
    st = check_request(e, off, total, 1);
    uint32_t *wv = words(e);
    for (uint64_t p = p0; st == ST_OK && p < p1; p++)
        if (!(wv[p] & MAPPED))
            st = ST_SLOW; /* a first write: Python allocates the page */
    if (st != ST_OK) {
        unlock_set(e, &ss);
        return st;
    }
    for (uint64_t p = p0; p < p1; p++)
        store_word(e, p, wv[p] | 1); /* odd: lock-free readers retry or wait */
    _mm_sfence(); /* the odd counters before any (non-temporal) store of the copy */
    Cursor c = {v, 0, 0};
    char *dst = (char *)e->data.buf + off;
    if (total >= GIL_FREE_BYTES) {
        Py_BEGIN_ALLOW_THREADS cursor_in(&c, dst, total);
        Py_END_ALLOW_THREADS
    } else {
        cursor_in(&c, dst, total);
    }
    _mm_sfence(); /* every store of the copy before the even counters */
    for (uint64_t p = p0; p < p1; p++) {
        uint32_t w = wv[p];
        store_word(e, p, MAPPED | ((w + 1) & SEQ_MASK));
    }
    unlock_set(e, &ss);
    return ST_OK;
}

/* ------------------------------------------------------------------ the Engine type */

static int get_exact(PyObject *obj, Py_buffer *b, int writable, const char *what) {
    if (PyObject_GetBuffer(obj, b, PyBUF_C_CONTIGUOUS | (writable ? PyBUF_WRITABLE : 0)) < 0) {
        PyErr_Format(PyExc_TypeError, "Engine: %s must be a %sbuffer", what,
                     writable ? "writable " : "");
        return -1;
    }
    return 0;
}

static void Engine_dealloc(EngineObject *e) {
    if (e->have_meta)
        PyBuffer_Release(&e->meta);
    if (e->have_data)
        PyBuffer_Release(&e->data);
    if (e->have_known)
        PyBuffer_Release(&e->known);
    Py_XDECREF(e->base);
    Py_TYPE(e)->tp_free((PyObject *)e);
}

static PyTypeObject EngineType;

static int Engine_init(EngineObject *e, PyObject *args, PyObject *kw) {
    static char *names[] = {"meta",     "data",       "known",    "fd",         "sector_size",
                            "page_shift", "max_pages", "data_offset", "writable", "base",
                            "base_pages", NULL};
    PyObject *meta, *data, *known, *base = Py_None;
    int fd, writable;
    unsigned long long sector_size, page_shift, max_pages, data_offset, base_pages = 0;
    if (e->have_meta) {
        PyErr_SetString(PyExc_RuntimeError, "Engine is initialised already");
        return -1;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOOiKKKKp|OK", names, &meta, &data, &known, &fd,
                                     &sector_size, &page_shift, &max_pages, &data_offset,
                                     &writable, &base, &base_pages))
        return -1;
    if (page_shift < 12 || page_shift > 16 || sector_size < 512 ||
        sector_size > (1ull << page_shift) || (sector_size & (sector_size - 1)) || fd < 0 ||
        max_pages > (1ull << 46) >> page_shift) {
        PyErr_SetString(PyExc_ValueError, "Engine: bad geometry");
        return -1;
    }
    if (base != Py_None && !PyObject_TypeCheck(base, &EngineType)) {
        PyErr_SetString(PyExc_TypeError, "Engine: base must be an Engine or None");
        return -1;
    }
    if (get_exact(meta, &e->meta, writable, "meta") < 0)
        return -1;
    e->have_meta = 1;
    if (get_exact(known, &e->known, 1, "known") < 0)
        return -1;
    e->have_known = 1;
    if (data != Py_None) {
        if (get_exact(data, &e->data, writable, "data") < 0)
            return -1;
        e->have_data = 1;
    } else {
        memset(&e->data, 0, sizeof e->data);
    }
    if ((uint64_t)e->meta.len < MAP_OFFSET + max_pages * 4 ||
        (uint64_t)e->known.len < (max_pages >> MAP_PAGE_SHIFT) + 1 ||
        ((uint64_t)e->data.len & ((1ull << page_shift) - 1)) ||
        (uint64_t)e->data.len > max_pages << page_shift) {
        PyErr_SetString(PyExc_ValueError, "Engine: buffers do not fit the geometry");
        return -1;
    }
    if (((uintptr_t)e->meta.buf & 63) || ((uintptr_t)e->data.buf & 4095)) {
        PyErr_SetString(PyExc_ValueError, "Engine: mappings must be page-aligned");
        return -1;
    }
    if (base != Py_None) {
        int depth = 0;
        for (EngineObject *b = (EngineObject *)base; b; b = b->base)
            if (++depth > MAX_CHAIN) {
                PyErr_SetString(PyExc_ValueError, "Engine: backing chain too deep");
                return -1;
            }
        Py_INCREF(base);
        e->base = (EngineObject *)base;
    }
    e->fd = fd;
    e->writable = writable;
    e->sector_size = sector_size;
    e->page_shift = page_shift;
    e->max_pages = max_pages;
    e->data_offset = data_offset;
    e->base_pages = base_pages;
    return 0;
}

static int ready(EngineObject *e) {
    if (!e->have_meta) {
        PyErr_SetString(PyExc_RuntimeError, "Engine is not initialised");
        return 0;
    }
    return 1;
}

static PyObject *request(EngineObject *e, PyObject *args, int writing) {
    PyObject *offobj, *bufs;
    if (!ready(e) || !PyArg_ParseTuple(args, "O!O", &PyLong_Type, &offobj, &bufs))
        return NULL;
    int overflow = 0;
    long long off = PyLong_AsLongLongAndOverflow(offobj, &overflow);
    if (off == -1 && PyErr_Occurred())
        return NULL;
    if (overflow)
        return PyLong_FromLong(ST_RANGE); /* beyond any disk: Python says how */
    Views v;
    int got = get_views(bufs, !writing, &v);
    if (got < 0)
        return NULL;
    if (got > 0)
        return PyLong_FromLong(ST_SLOW);
    int st = writing ? do_write(e, off, &v) : do_read(e, off, &v);
    release_views(&v);
    if (st < 0)
        return NULL;
    return PyLong_FromLong(st);
}

/* read_sectors / write_sectors(sector, buffer): Disk.read and Disk.write's own fast path.
 * Only the plain case is done here: an exact int sector and one contiguous buffer of plain
 * format whose length is a non-zero whole number of sectors. Anything else (and any failure
 * to take the buffer) returns ST_SLOW without an exception set: the Python front then checks
 * the arguments itself and raises the typed error. */
static PyObject *sector_request(EngineObject *e, PyObject *const *args, Py_ssize_t nargs,
                                int writing) {
    if (!ready(e))
        return NULL;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "expected (sector, buffer)");
        return NULL;
    }
    PyObject *sector = args[0], *buf = args[1];
    if (!PyLong_CheckExact(sector) || PyList_Check(buf) || PyTuple_Check(buf))
        return PyLong_FromLong(ST_SLOW);
    int overflow = 0;
    long long s = PyLong_AsLongLongAndOverflow(sector, &overflow);
    if ((s == -1 && PyErr_Occurred()) || overflow) {
        PyErr_Clear();
        return PyLong_FromLong(ST_SLOW);
    }
    Views v;
    int flags = PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writing ? 0 : PyBUF_WRITABLE);
    if (PyObject_GetBuffer(buf, &v.view[0], flags) < 0) {
        PyErr_Clear();
        return PyLong_FromLong(ST_SLOW);
    }
    v.n = 1;
    v.total = (uint64_t)v.view[0].len;
    int st = ST_SLOW;
    long long limit = (long long)(e->max_pages << e->page_shift) / (long long)e->sector_size;
    if (plain_format(v.view[0].format) && v.total && v.total % e->sector_size == 0 && s >= 0 &&
        s <= limit) {
        long long off = s * (long long)e->sector_size;
        st = writing ? do_write(e, off, &v) : do_read(e, off, &v);
    }
    release_views(&v);
    if (st < 0)
        return NULL;
    return PyLong_FromLong(st);
}

static PyObject *Engine_read_sectors(EngineObject *e, PyObject *const *args, Py_ssize_t n) {
    return sector_request(e, args, n, 0);
}

static PyObject *Engine_write_sectors(EngineObject *e, PyObject *const *args, Py_ssize_t n) {
    return sector_request(e, args, n, 1);
}

static PyObject *Engine_read(EngineObject *e, PyObject *args) { return request(e, args, 0); }

static PyObject *Engine_write(EngineObject *e, PyObject *args) { return request(e, args, 1); }

static int stripe_arg(EngineObject *e, PyObject *args, unsigned long long *s, int need_write) {
    if (!ready(e) || !PyArg_ParseTuple(args, "K", s))
        return -1;
    if (*s >= STRIPES) {
        PyErr_SetString(PyExc_ValueError, "stripe out of range");
        return -1;
    }
    if (need_write && !e->writable) {
        PyErr_SetString(PyExc_PermissionError, "a read-only mapping cannot take locks");
        return -1;
    }
    return 0;
}

/* trylock(stripe) -> 0 (taken, repaired if its holder had died) or an errno (EBUSY, ...) */
static PyObject *Engine_trylock(EngineObject *e, PyObject *args) {
    unsigned long long s;
    if (stripe_arg(e, args, &s, 1) < 0)
        return NULL;
    int rc = try_stripe(e, s);
    if (rc == 0)
        held_here++;
    return PyLong_FromLong(rc);
}

/* lock(stripe, timeout_ns) -> 0 or an errno (ETIMEDOUT, ...). Waits without the GIL. */
static PyObject *Engine_lock(EngineObject *e, PyObject *args) {
    unsigned long long s, ns;
    if (!ready(e) || !PyArg_ParseTuple(args, "KK", &s, &ns))
        return NULL;
    if (s >= STRIPES || !e->writable) {
        PyErr_SetString(PyExc_ValueError, "stripe out of range or read-only mapping");
        return NULL;
    }
    pthread_mutex_t *m = mutex_of(e, s);
    struct timespec at;
    clock_gettime(CLOCK_MONOTONIC, &at);
    at.tv_sec += (time_t)(ns / 1000000000ull);
    at.tv_nsec += (long)(ns % 1000000000ull);
    if (at.tv_nsec >= 1000000000L) {
        at.tv_sec++;
        at.tv_nsec -= 1000000000L;
    }
    int rc = pthread_mutex_trylock(m);
    if (rc == EBUSY) {
        Py_BEGIN_ALLOW_THREADS rc = pthread_mutex_clocklock(m, CLOCK_MONOTONIC, &at);
        Py_END_ALLOW_THREADS
    }
    if (rc == EOWNERDEAD) {
        repair(e, s);
        rc = pthread_mutex_consistent(m);
    }
    if (rc == 0)
        held_here++;
    return PyLong_FromLong(rc);
}

static PyObject *Engine_unlock(EngineObject *e, PyObject *args) {
    unsigned long long s;
    if (stripe_arg(e, args, &s, 1) < 0)
        return NULL;
    int rc = pthread_mutex_unlock(mutex_of(e, s));
    if (rc) {
        errno = rc;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    if (held_here)
        held_here--;
    Py_RETURN_NONE;
}

/* set_intent(stripe, first, count): what the holder of `stripe` is about to change. */
static PyObject *Engine_set_intent(EngineObject *e, PyObject *args) {
    unsigned long long s, first, count;
    if (!ready(e) || !PyArg_ParseTuple(args, "KKK", &s, &first, &count))
        return NULL;
    if (s >= STRIPES || !e->writable) {
        PyErr_SetString(PyExc_ValueError, "stripe out of range or read-only mapping");
        return NULL;
    }
    *(volatile uint64_t *)(slot(e, s) + INTENT_FIRST) = first;
    *(volatile uint64_t *)(slot(e, s) + INTENT_COUNT) = count;
    Py_RETURN_NONE;
}

/* init_stripes(): make every slot a fresh robust, process-shared mutex (the creator only,
 * before the segment has a name). */
static PyObject *Engine_init_stripes(EngineObject *e, PyObject *unused) {
    if (!ready(e))
        return NULL;
    if (!e->writable) {
        PyErr_SetString(PyExc_PermissionError, "a read-only mapping cannot take locks");
        return NULL;
    }
    pthread_mutexattr_t attr;
    int rc = pthread_mutexattr_init(&attr);
    if (!rc)
        rc = pthread_mutexattr_setpshared(&attr, PTHREAD_PROCESS_SHARED);
    if (!rc)
        rc = pthread_mutexattr_setrobust(&attr, PTHREAD_MUTEX_ROBUST);
    /* The type stays the default (normal), as the python engine makes it: an explicit
     * settype would also mark the mutex "no elision", a different __kind word. */
    for (uint64_t s = 0; !rc && s < STRIPES; s++) {
        memset(slot(e, s), 0, SLOT_SIZE);
        rc = pthread_mutex_init(mutex_of(e, s), &attr);
    }
    pthread_mutexattr_destroy(&attr);
    if (rc) {
        errno = rc;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    Py_RETURN_NONE;
}

static PyObject *Engine_fence(EngineObject *e, PyObject *unused) {
    _mm_sfence();
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    Py_RETURN_NONE;
}

static PyMethodDef Engine_methods[] = {
    {"read", (PyCFunction)Engine_read, METH_VARARGS,
     "read(offset, buffers) -> status: fill buffers from byte offset, lock-free"},
    {"write", (PyCFunction)Engine_write, METH_VARARGS,
     "write(offset, buffers) -> status: a rewrite of mapped pages under their stripes"},
    {"read_sectors", (PyCFunction)(void (*)(void))Engine_read_sectors, METH_FASTCALL,
     "read_sectors(sector, buffer) -> status: read() for the plain case, else ST_SLOW"},
    {"write_sectors", (PyCFunction)(void (*)(void))Engine_write_sectors, METH_FASTCALL,
     "write_sectors(sector, buffer) -> status: write() for the plain case, else ST_SLOW"},
    {"trylock", (PyCFunction)Engine_trylock, METH_VARARGS,
     "trylock(stripe) -> 0 or errno; a dead holder's pages are repaired first"},
    {"lock", (PyCFunction)Engine_lock, METH_VARARGS,
     "lock(stripe, timeout_ns) -> 0 or errno (ETIMEDOUT); waits without the GIL"},
    {"unlock", (PyCFunction)Engine_unlock, METH_VARARGS, "unlock(stripe)"},
    {"set_intent", (PyCFunction)Engine_set_intent, METH_VARARGS,
     "set_intent(stripe, first_page, page_count)"},
    {"init_stripes", (PyCFunction)Engine_init_stripes, METH_NOARGS,
     "init_stripes(): fresh robust process-shared mutexes in every slot"},
    {"fence", (PyCFunction)Engine_fence, METH_NOARGS, "fence(): order all earlier stores"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject EngineType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "shmdisk._native.Engine",
    .tp_basicsize = sizeof(EngineObject),
    .tp_dealloc = (destructor)Engine_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "The page-I/O fast path of one mapping of a segment (see shmdisk/_pageio.py).",
    .tp_methods = Engine_methods,
    .tp_init = (initproc)Engine_init,
    .tp_new = PyType_GenericNew,
};

/* ---------------------------------------------------------------- Front
 *
 * The base class of shmdisk.Disk: read() and write() in one C call for the common request.
 * It asks the handle's page I/O (``self._io``, whose read_sectors / write_sectors are the
 * engine's calls for the current mapping) to do it; when that says ST_SLOW or anything else,
 * or the call is not the plain one, it hands every argument as given to Disk._read_general /
 * _write_general, which check them, wait, and raise the typed errors. A Python frame costs
 * about a quarter of a 4 KiB write here, hence this type rather than a Python method. */

typedef struct {
    PyObject_HEAD
    PyObject *io;
} FrontObject;

static PyObject *str_read_sectors, *str_write_sectors, *str_read_general, *str_write_general;

/* The signature read/write(sector, buffers, *, wait, timeout), checked here so that a wrong
 * call is told about read() or write(), not about the method it would have been passed to.
 * Returns -1 (TypeError set), 1 for the plain call the engine may do at once (two positional
 * arguments and no timeout but None; wait does not matter to a request done at once), or 0
 * for any other right one. Keyword names are always str here. */
static int check_call(const char *meth, Py_ssize_t nargs, PyObject *const *args,
                      PyObject *kwnames) {
    if (nargs > 2) {
        PyErr_Format(PyExc_TypeError, "%s() takes 2 positional arguments but %zd were given",
                     meth, nargs);
        return -1;
    }
    int have_sector = nargs >= 1, have_buffers = nargs >= 2, plain = nargs == 2;
    Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    for (Py_ssize_t i = 0; i < nkw; i++) {
        PyObject *key = PyTuple_GET_ITEM(kwnames, i);
        int *have = NULL;
        if (PyUnicode_CompareWithASCIIString(key, "timeout") == 0) {
            plain &= args[nargs + i] == Py_None;
            continue;
        }
        if (PyUnicode_CompareWithASCIIString(key, "wait") == 0)
            continue;
        if (PyUnicode_CompareWithASCIIString(key, "sector") == 0)
            have = &have_sector;
        else if (PyUnicode_CompareWithASCIIString(key, "buffers") == 0)
            have = &have_buffers;
        else {
            PyErr_Format(PyExc_TypeError, "%s() got an unexpected keyword argument '%U'", meth,
                         key);
            return -1;
        }
        if (*have) {
            PyErr_Format(PyExc_TypeError, "%s() got multiple values for argument '%U'", meth,
                         key);
            return -1;
        }
        *have = 1;
    }
    if (!have_sector || !have_buffers) {
        PyErr_Format(PyExc_TypeError, "%s() missing required argument '%s'", meth,
                     have_sector ? "buffers" : "sector");
        return -1;
    }
    return plain;
}

static PyObject *front_request(FrontObject *self, PyObject *const *args, size_t nargsf,
                               PyObject *kwnames, int writing) {
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    int plain = check_call(writing ? "write" : "read", nargs, args, kwnames);
    if (plain < 0)
        return NULL;
    if (plain && self->io) {
        PyObject *call = PyObject_GetAttr(self->io, writing ? str_write_sectors : str_read_sectors);
        if (!call)
            return NULL;
        PyObject *st = PyObject_Vectorcall(call, args, 2, NULL);
        Py_DECREF(call);
        if (!st)
            return NULL;
        int overflow = 0;
        int done = PyLong_CheckExact(st) && PyLong_AsLongAndOverflow(st, &overflow) == ST_OK &&
                   !overflow;
        Py_DECREF(st);
        if (done)
            Py_RETURN_NONE;
    }
    /* The general path, with the arguments exactly as the caller gave them. */
    /* Checked: sector and buffers once each, wait and timeout at most once: 4 at most. */
    Py_ssize_t n = nargs + (kwnames ? PyTuple_GET_SIZE(kwnames) : 0);
    PyObject *all[5];
    if (n > 4) {
        PyErr_Format(PyExc_TypeError, "%s(): a keyword argument given twice",
                     writing ? "write" : "read");
        return NULL;
    }
    all[0] = (PyObject *)self;
    for (Py_ssize_t i = 0; i < n; i++)
        all[i + 1] = args[i];
    return PyObject_VectorcallMethod(writing ? str_write_general : str_read_general, all,
                                     (size_t)(nargs + 1), kwnames);
}

static PyObject *Front_read(FrontObject *self, PyObject *const *args, size_t nargsf,
                            PyObject *kwnames) {
    return front_request(self, args, nargsf, kwnames, 0);
}

static PyObject *Front_write(FrontObject *self, PyObject *const *args, size_t nargsf,
                             PyObject *kwnames) {
    return front_request(self, args, nargsf, kwnames, 1);
}

static int Front_traverse(FrontObject *self, visitproc visit, void *arg) {
    Py_VISIT(self->io);
    return 0;
}

static int Front_clear(FrontObject *self) {
    Py_CLEAR(self->io);
    return 0;
}

/* Disk's own dealloc (a heap subtype's) drops the reference to its type. */
static void Front_dealloc(FrontObject *self) {
    PyObject_GC_UnTrack(self);
    Front_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef Front_methods[] = {
    {"read", (PyCFunction)(void (*)(void))Front_read, METH_FASTCALL | METH_KEYWORDS,
     "read($self, sector, buffers, *, wait=True, timeout=None)\n--\n\n"
     "Fill ``buffers`` (one or a list, each whole sectors) from ``sector`` onwards.\n\n"
     "Atomic against every write from any thread or process. With ``wait=False`` a read that\n"
     "would have to wait for a writer raises ``WouldBlockError``; with ``timeout`` one that\n"
     "waits longer raises ``LockTimeoutError``; either way nothing was read."},
    {"write", (PyCFunction)(void (*)(void))Front_write, METH_FASTCALL | METH_KEYWORDS,
     "write($self, sector, buffers, *, wait=True, timeout=None)\n--\n\n"
     "Copy ``buffers`` (one or a list, each whole sectors) to the disk at ``sector``.\n\n"
     "All or nothing, and atomic against every other call from any thread or process.\n"
     "``wait`` and ``timeout`` as for ``read``."},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef Front_members[] = {
    {"_io", T_OBJECT_EX, offsetof(FrontObject, io), 0, "the handle's page I/O"},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject FrontType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "shmdisk._native.Front",
    .tp_basicsize = sizeof(FrontObject),
    .tp_dealloc = (destructor)Front_dealloc,
    .tp_traverse = (traverseproc)Front_traverse,
    .tp_clear = (inquiry)Front_clear,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "The base of shmdisk.Disk: read() and write() of the common request in C.",
    .tp_methods = Front_methods,
    .tp_members = Front_members,
    .tp_new = PyType_GenericNew,
};

static PyObject *mod_repaired_pages(PyObject *m, PyObject *unused) {
    return PyLong_FromUnsignedLongLong(repaired_pages);
}

static PyMethodDef module_methods[] = {
    {"repaired_pages", mod_repaired_pages, METH_NOARGS,
     "pages this process repaired after a lock holder died"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef native_module = {
    PyModuleDef_HEAD_INIT, "shmdisk._native",
    "The common page-I/O requests of shmdisk in C (see shmdisk/_pageio.py).", -1,
    module_methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__native(void) {
    if (PyType_Ready(&EngineType) < 0 || PyType_Ready(&FrontType) < 0)
        return NULL;
    str_read_sectors = PyUnicode_InternFromString("read_sectors");
    str_write_sectors = PyUnicode_InternFromString("write_sectors");
    str_read_general = PyUnicode_InternFromString("_read_general");
    str_write_general = PyUnicode_InternFromString("_write_general");
    if (!str_read_sectors || !str_write_sectors || !str_read_general || !str_write_general)
        return NULL;
    if (pthread_atfork(NULL, NULL, forget_after_fork) != 0) {
        PyErr_SetString(PyExc_RuntimeError, "pthread_atfork failed");
        return NULL;
    }
    PyObject *m = PyModule_Create(&native_module);
    if (!m)
        return NULL;
    Py_INCREF(&EngineType);
    if (PyModule_AddObject(m, "Engine", (PyObject *)&EngineType) < 0) {
        Py_DECREF(&EngineType);
        Py_DECREF(m);
        return NULL;
    }
    Py_INCREF(&FrontType);
    if (PyModule_AddObject(m, "Front", (PyObject *)&FrontType) < 0) {
        Py_DECREF(&FrontType);
        Py_DECREF(m);
        return NULL;
    }
    PyModule_AddIntConstant(m, "MUTEX_SIZE", (long)sizeof(pthread_mutex_t));
    PyModule_AddIntConstant(m, "STRIPES", STRIPES);
    PyModule_AddIntConstant(m, "STRIPE_SHIFT", STRIPE_SHIFT);
    PyModule_AddIntConstant(m, "SLOT_SIZE", SLOT_SIZE);
    PyModule_AddIntConstant(m, "LOCK_OFFSET", LOCK_OFFSET);
    PyModule_AddIntConstant(m, "MAP_OFFSET", MAP_OFFSET);
    PyModule_AddIntConstant(m, "INTENT_FIRST", INTENT_FIRST);
    PyModule_AddIntConstant(m, "INTENT_COUNT", INTENT_COUNT);
    PyModule_AddIntConstant(m, "F_SIZE_SECTORS", F_SIZE_SECTORS);
    PyModule_AddIntConstant(m, "F_DESTROYED", F_DESTROYED);
    PyModule_AddIntConstant(m, "F_FROZEN", F_FROZEN);
    PyModule_AddIntConstant(m, "MAPPED", (long)MAPPED);
    PyModule_AddIntConstant(m, "ZEROED", (long)ZEROED);
    PyModule_AddIntConstant(m, "ST_OK", ST_OK);
    PyModule_AddIntConstant(m, "ST_SLOW", ST_SLOW);
    PyModule_AddIntConstant(m, "ST_RANGE", ST_RANGE);
    PyModule_AddIntConstant(m, "ST_GONE", ST_GONE);
    PyModule_AddIntConstant(m, "ST_READONLY", ST_READONLY);
    PyModule_AddIntConstant(m, "ST_BASE_GONE", ST_BASE_GONE);
    return m;
}
