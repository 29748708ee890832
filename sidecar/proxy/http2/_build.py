"""Builds ``sidecar.proxy.http2._nghttp2``: a thin cffi (API mode) binding over nghttp2.

Run at install (``setup.py``'s ``cffi_modules``). nghttp2 does framing, HPACK,
flow control and the flood limits in C; the few lines of C here keep Python out
of the per-header and per-byte work:

- a header block is collected in C as ``name\\0value\\0...`` and handed to
  Python once per block (``tc_py_headers``), and blocks to send are given in
  the same packed form, so a block received can be forwarded unchanged;
- each stream we send DATA on owns a ``tc_stream``: a byte queue that nghttp2's
  data provider reads from (``NGHTTP2_ERR_DEFERRED`` while it is empty, resumed
  by ``tc_write``), and the trailers to send once it is empty;
- everything a session has to send is gathered into one buffer per flush.

Python hears only: a header block, a DATA frame (with whether it ends the stream),
and events (stream closed, GOAWAY, a frame not sent, a send queue drained below its
mark).
"""

from __future__ import annotations

from cffi import FFI

CDEF = """
typedef struct tc_session tc_session;
typedef struct tc_stream tc_stream;

#define TC_EV_CLOSE ...
#define TC_EV_GOAWAY ...
#define TC_EV_NOT_SENT ...
#define TC_EV_DRAINED ...

#define NGHTTP2_NO_ERROR ...
#define NGHTTP2_PROTOCOL_ERROR ...
#define NGHTTP2_INTERNAL_ERROR ...
#define NGHTTP2_REFUSED_STREAM ...
#define NGHTTP2_CANCEL ...
#define NGHTTP2_ENHANCE_YOUR_CALM ...
#define NGHTTP2_HCAT_REQUEST ...
#define NGHTTP2_HCAT_RESPONSE ...
#define NGHTTP2_HCAT_HEADERS ...

typedef struct {
    uint32_t max_concurrent_streams;   /* advertised (server) */
    uint32_t stream_window;            /* our SETTINGS_INITIAL_WINDOW_SIZE */
    uint32_t connection_window;        /* our connection receive window */
    uint32_t max_header_list;          /* bytes (RFC 7541 sizes), larger blocks are flagged */
    uint64_t reset_burst;              /* rapid reset budget: burst and per-second rate */
    uint64_t reset_rate;
    size_t max_continuations;
    size_t max_settings;
    size_t max_outbound_ack;
} tc_limits;

tc_session *tc_session_new(int server, void *handle, const tc_limits *limits);
void tc_session_del(tc_session *ts);
long tc_recv(tc_session *ts, const uint8_t *data, size_t len);
long tc_send(tc_session *ts, size_t max);
const uint8_t *tc_out(tc_session *ts);
int tc_want_read(tc_session *ts);
int tc_want_write(tc_session *ts);
int tc_finished(tc_session *ts);

tc_stream *tc_stream_new(void);
void tc_stream_free(tc_stream *st);
int32_t tc_submit_request(tc_session *ts, const char *block, size_t len, size_t count,
                          tc_stream *st);
int tc_submit_response(tc_session *ts, int32_t stream_id, const char *block, size_t len,
                       size_t count, tc_stream *st);
int tc_submit_headers(tc_session *ts, int32_t stream_id, const char *block, size_t len,
                      size_t count, int end_stream);
int tc_write(tc_session *ts, tc_stream *st, const uint8_t *data, size_t len);
int tc_end(tc_session *ts, tc_stream *st, const char *trailers, size_t len, size_t count);
size_t tc_buffered(tc_stream *st);
void tc_notify_below(tc_stream *st, size_t mark);

int tc_consume(tc_session *ts, int32_t stream_id, size_t n);
int tc_consume_connection(tc_session *ts, size_t n);
int tc_reset(tc_session *ts, int32_t stream_id, uint32_t code);
int tc_goaway(tc_session *ts, uint32_t code);
int tc_terminate(tc_session *ts, uint32_t code);
uint32_t tc_remote_max_streams(tc_session *ts);
int tc_ping(tc_session *ts);
const char *nghttp2_strerror(int lib_error_code);

extern "Python" int tc_py_headers(void *, int32_t, int, const char *, size_t, int, int);
extern "Python" int tc_py_data(void *, int32_t, const uint8_t *, size_t, int);
extern "Python" int tc_py_event(void *, int, int32_t, uint32_t);
"""

SOURCE = r"""
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <nghttp2/nghttp2.h>

typedef struct tc_session tc_session;
typedef struct tc_stream tc_stream;

#define TC_EV_CLOSE 2     /* stream closed; code = error code */
#define TC_EV_GOAWAY 3    /* stream id = last stream id; code = error code */
#define TC_EV_NOT_SENT 4  /* a HEADERS we submitted could not be sent */
#define TC_EV_DRAINED 5   /* a stream's send queue fell to its mark */

static int tc_py_headers(void *, int32_t, int, const char *, size_t, int, int);
static int tc_py_data(void *, int32_t, const uint8_t *, size_t, int);
static int tc_py_event(void *, int, int32_t, uint32_t);

typedef struct {
    uint32_t max_concurrent_streams;
    uint32_t stream_window;
    uint32_t connection_window;
    uint32_t max_header_list;
    uint64_t reset_burst;
    uint64_t reset_rate;
    size_t max_continuations;
    size_t max_settings;
    size_t max_outbound_ack;
} tc_limits;

typedef struct { uint8_t *p; size_t len, cap; } tc_buf;

struct tc_session {
    nghttp2_session *s;
    void *handle;
    tc_buf hdr;          /* the header block being received */
    size_t hdr_size;     /* its size as RFC 7541 counts it */
    int hdr_over;        /* it passed max_header_list: no longer collected */
    uint32_t max_header_list;
    tc_buf out;          /* what the last tc_send gathered */
    tc_buf data;         /* the DATA frame being received: handed over whole, with its flags */
    /* Rapid reset (CVE-2023-44487): RST_STREAMs received, as a token bucket. nghttp2's own
       limit answers INTERNAL_ERROR; this one, tighter, answers ENHANCE_YOUR_CALM. */
    double reset_tokens, reset_burst, reset_rate, reset_at;
};

static double now_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

static void count_reset(tc_session *ts) {
    if (ts->reset_burst <= 0) return;
    double now = now_s();
    ts->reset_tokens += (now - ts->reset_at) * ts->reset_rate;
    if (ts->reset_tokens > ts->reset_burst) ts->reset_tokens = ts->reset_burst;
    ts->reset_at = now;
    if (ts->reset_tokens < 1) {
        nghttp2_session_terminate_session(ts->s, NGHTTP2_ENHANCE_YOUR_CALM);
        ts->reset_burst = 0;  /* said once */
        return;
    }
    ts->reset_tokens -= 1;
}

struct tc_stream {
    uint8_t *p; size_t off, len, cap;  /* DATA queued to send: p[off..len) */
    int eof;                           /* nothing follows the queue */
    int deferred;                      /* the data provider is waiting for tc_write */
    char *trailers; size_t tlen, tcount;
    size_t mark; int notify;           /* TC_EV_DRAINED once queued <= mark */
    int32_t id;
};

static int buf_reserve(tc_buf *b, size_t extra) {
    if (b->len + extra <= b->cap) return 0;
    size_t cap = b->cap ? b->cap : 512;
    while (cap < b->len + extra) cap *= 2;
    uint8_t *p = realloc(b->p, cap);
    if (!p) return -1;
    b->p = p; b->cap = cap;
    return 0;
}

/* A packed block "name\0value\0..." of |count| fields -> nghttp2_nv (pointing into it). */
static nghttp2_nv *unpack(const char *block, size_t len, size_t count) {
    nghttp2_nv *nva = malloc(sizeof(nghttp2_nv) * (count ? count : 1));
    if (!nva) return NULL;
    const char *p = block, *end = block + len;
    for (size_t i = 0; i < count; i++) {
        const char *n = p;
        const char *z = memchr(p, 0, end - p);
        if (!z) { free(nva); return NULL; }
        const char *v = z + 1;
        const char *z2 = memchr(v, 0, end - v);
        if (!z2) { free(nva); return NULL; }
        nva[i].name = (uint8_t *)n; nva[i].namelen = z - n;
        nva[i].value = (uint8_t *)v; nva[i].valuelen = z2 - v;
        nva[i].flags = NGHTTP2_NV_FLAG_NONE;
        p = z2 + 1;
    }
    return nva;
}

static int on_begin_headers(nghttp2_session *s, const nghttp2_frame *f, void *u) {
    tc_session *ts = u;
    ts->hdr.len = 0; ts->hdr_size = 0; ts->hdr_over = 0;
    return 0;
}

static int on_header(nghttp2_session *s, const nghttp2_frame *f, const uint8_t *name,
                     size_t namelen, const uint8_t *value, size_t valuelen, uint8_t flags,
                     void *u) {
    tc_session *ts = u;
    if (ts->hdr_over) return 0;
    ts->hdr_size += namelen + valuelen + 32;
    if (ts->hdr_size > ts->max_header_list) { ts->hdr_over = 1; ts->hdr.len = 0; return 0; }
    if (buf_reserve(&ts->hdr, namelen + valuelen + 2)) return NGHTTP2_ERR_CALLBACK_FAILURE;
    uint8_t *w = ts->hdr.p + ts->hdr.len;
    memcpy(w, name, namelen); w[namelen] = 0;
    memcpy(w + namelen + 1, value, valuelen); w[namelen + 1 + valuelen] = 0;
    ts->hdr.len += namelen + valuelen + 2;
    return 0;
}

static int on_frame_recv(nghttp2_session *s, const nghttp2_frame *f, void *u) {
    tc_session *ts = u;
    switch (f->hd.type) {
    case NGHTTP2_HEADERS:
        if (tc_py_headers(ts->handle, f->hd.stream_id, f->headers.cat, (const char *)ts->hdr.p,
                          ts->hdr.len, (f->hd.flags & NGHTTP2_FLAG_END_STREAM) != 0,
                          ts->hdr_over))
            return NGHTTP2_ERR_CALLBACK_FAILURE;
        ts->hdr.len = 0;
        break;
    case NGHTTP2_DATA:
        if (tc_py_data(ts->handle, f->hd.stream_id, ts->data.p, ts->data.len,
                       (f->hd.flags & NGHTTP2_FLAG_END_STREAM) != 0))
            return NGHTTP2_ERR_CALLBACK_FAILURE;
        ts->data.len = 0;
        break;
    case NGHTTP2_RST_STREAM:
        count_reset(ts);
        break;
    case NGHTTP2_GOAWAY:
        if (tc_py_event(ts->handle, TC_EV_GOAWAY, f->goaway.last_stream_id, f->goaway.error_code))
            return NGHTTP2_ERR_CALLBACK_FAILURE;
        break;
    }
    return 0;
}

static int on_begin_frame(nghttp2_session *s, const nghttp2_frame_hd *hd, void *u) {
    tc_session *ts = u;
    if (hd->type == NGHTTP2_DATA) ts->data.len = 0;
    return 0;
}

/* Chunks of one DATA frame come in a row (frames do not interleave): gathered here, given
   to Python once per frame by on_frame_recv. At most one frame (16 KiB: our
   SETTINGS_MAX_FRAME_SIZE is the default) is held. */
static int on_data_chunk(nghttp2_session *s, uint8_t flags, int32_t sid, const uint8_t *data,
                         size_t len, void *u) {
    tc_session *ts = u;
    if (buf_reserve(&ts->data, len)) return NGHTTP2_ERR_CALLBACK_FAILURE;
    memcpy(ts->data.p + ts->data.len, data, len);
    ts->data.len += len;
    return 0;
}

static int on_stream_close(nghttp2_session *s, int32_t sid, uint32_t code, void *u) {
    tc_session *ts = u;
    return tc_py_event(ts->handle, TC_EV_CLOSE, sid, code) ? NGHTTP2_ERR_CALLBACK_FAILURE : 0;
}

static int on_not_send(nghttp2_session *s, const nghttp2_frame *f, int err, void *u) {
    tc_session *ts = u;
    if (f->hd.type != NGHTTP2_HEADERS) return 0;
    return tc_py_event(ts->handle, TC_EV_NOT_SENT, f->hd.stream_id, (uint32_t)-err)
        ? NGHTTP2_ERR_CALLBACK_FAILURE : 0;
}

static void submit_trailers(nghttp2_session *s, int32_t sid, tc_stream *st) {
    nghttp2_nv *nva = unpack(st->trailers, st->tlen, st->tcount);
    if (nva) { nghttp2_submit_trailer(s, sid, nva, st->tcount); free(nva); }
    free(st->trailers); st->trailers = NULL;
}

static ssize_t read_data(nghttp2_session *s, int32_t sid, uint8_t *buf, size_t length,
                         uint32_t *flags, nghttp2_data_source *src, void *u) {
    tc_session *ts = u;
    tc_stream *st = src->ptr;
    size_t n = st->len - st->off;
    if (n > length) n = length;
    if (n) {
        memcpy(buf, st->p + st->off, n);
        st->off += n;
        if (st->off == st->len) st->off = st->len = 0;
    }
    if (st->off == st->len) {
        if (!st->eof) {
            if (!n) { st->deferred = 1; return NGHTTP2_ERR_DEFERRED; }
        } else {
            *flags |= NGHTTP2_DATA_FLAG_EOF;
            if (st->trailers) {
                *flags |= NGHTTP2_DATA_FLAG_NO_END_STREAM;
                submit_trailers(s, sid, st);
            }
        }
    }
    if (st->notify && st->len - st->off <= st->mark) {
        st->notify = 0;
        if (tc_py_event(ts->handle, TC_EV_DRAINED, sid, 0)) return NGHTTP2_ERR_CALLBACK_FAILURE;
    }
    return (ssize_t)n;
}

tc_session *tc_session_new(int server, void *handle, const tc_limits *lim) {
    tc_session *ts = calloc(1, sizeof(tc_session));
    if (!ts) return NULL;
    ts->handle = handle;
    ts->max_header_list = lim->max_header_list;
    nghttp2_session_callbacks *cb;
    nghttp2_option *opt;
    if (nghttp2_session_callbacks_new(&cb)) { free(ts); return NULL; }
    nghttp2_session_callbacks_set_on_begin_headers_callback(cb, on_begin_headers);
    nghttp2_session_callbacks_set_on_header_callback(cb, on_header);
    nghttp2_session_callbacks_set_on_frame_recv_callback(cb, on_frame_recv);
    nghttp2_session_callbacks_set_on_begin_frame_callback(cb, on_begin_frame);
    nghttp2_session_callbacks_set_on_data_chunk_recv_callback(cb, on_data_chunk);
    nghttp2_session_callbacks_set_on_stream_close_callback(cb, on_stream_close);
    nghttp2_session_callbacks_set_on_frame_not_send_callback(cb, on_not_send);
    if (nghttp2_option_new(&opt)) { nghttp2_session_callbacks_del(cb); free(ts); return NULL; }
    nghttp2_option_set_no_auto_window_update(opt, 1);
    nghttp2_option_set_max_continuations(opt, lim->max_continuations);
    nghttp2_option_set_max_settings(opt, lim->max_settings);
    nghttp2_option_set_max_outbound_ack(opt, lim->max_outbound_ack);
    nghttp2_option_set_max_deflate_dynamic_table_size(opt, 4096);
    if (server) {
        nghttp2_option_set_stream_reset_rate_limit(opt, lim->reset_burst * 4, lim->reset_rate * 4);
        ts->reset_tokens = ts->reset_burst = (double)lim->reset_burst;
        ts->reset_rate = (double)lim->reset_rate;
        ts->reset_at = now_s();
    }
    int rv = server ? nghttp2_session_server_new2(&ts->s, cb, ts, opt)
                    : nghttp2_session_client_new2(&ts->s, cb, ts, opt);
    nghttp2_session_callbacks_del(cb);
    nghttp2_option_del(opt);
    if (rv) { free(ts); return NULL; }
    nghttp2_settings_entry iv[4];
    size_t n = 0;
    iv[n].settings_id = NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE; iv[n++].value = lim->stream_window;
    iv[n].settings_id = NGHTTP2_SETTINGS_MAX_HEADER_LIST_SIZE; iv[n++].value = lim->max_header_list;
    if (server) {
        iv[n].settings_id = NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS;
        iv[n++].value = lim->max_concurrent_streams;
    } else {
        iv[n].settings_id = NGHTTP2_SETTINGS_ENABLE_PUSH; iv[n++].value = 0;
    }
    nghttp2_submit_settings(ts->s, NGHTTP2_FLAG_NONE, iv, n);
    if (lim->connection_window > 65535)
        nghttp2_session_set_local_window_size(ts->s, NGHTTP2_FLAG_NONE, 0, lim->connection_window);
    return ts;
}

void tc_session_del(tc_session *ts) {
    if (!ts) return;
    nghttp2_session_del(ts->s);
    free(ts->hdr.p); free(ts->out.p); free(ts->data.p); free(ts);
}

long tc_recv(tc_session *ts, const uint8_t *data, size_t len) {
    return (long)nghttp2_session_mem_recv(ts->s, data, len);
}

/* Gathers up to about |max| bytes of frames to send; tc_out points at them. */
long tc_send(tc_session *ts, size_t max) {
    ts->out.len = 0;
    while (ts->out.len < max) {
        const uint8_t *p;
        ssize_t n = nghttp2_session_mem_send(ts->s, &p);
        if (n < 0) return (long)n;
        if (n == 0) break;
        if (buf_reserve(&ts->out, (size_t)n)) return NGHTTP2_ERR_NOMEM;
        memcpy(ts->out.p + ts->out.len, p, (size_t)n);
        ts->out.len += (size_t)n;
    }
    return (long)ts->out.len;
}

const uint8_t *tc_out(tc_session *ts) { return ts->out.p; }
int tc_want_read(tc_session *ts) { return nghttp2_session_want_read(ts->s); }
int tc_want_write(tc_session *ts) { return nghttp2_session_want_write(ts->s); }
int tc_finished(tc_session *ts) {
    return !nghttp2_session_want_read(ts->s) && !nghttp2_session_want_write(ts->s);
}

tc_stream *tc_stream_new(void) { return calloc(1, sizeof(tc_stream)); }

void tc_stream_free(tc_stream *st) {
    if (!st) return;
    free(st->p); free(st->trailers); free(st);
}

int32_t tc_submit_request(tc_session *ts, const char *block, size_t len, size_t count,
                          tc_stream *st) {
    nghttp2_nv *nva = unpack(block, len, count);
    if (!nva) return NGHTTP2_ERR_INVALID_ARGUMENT;
    nghttp2_data_provider dp;
    dp.source.ptr = st; dp.read_callback = read_data;
    int32_t sid = nghttp2_submit_request(ts->s, NULL, nva, count, st ? &dp : NULL, NULL);
    free(nva);
    if (st && sid > 0) st->id = sid;
    return sid;
}

int tc_submit_response(tc_session *ts, int32_t sid, const char *block, size_t len,
                       size_t count, tc_stream *st) {
    nghttp2_nv *nva = unpack(block, len, count);
    if (!nva) return NGHTTP2_ERR_INVALID_ARGUMENT;
    nghttp2_data_provider dp;
    dp.source.ptr = st; dp.read_callback = read_data;
    int rv = nghttp2_submit_response(ts->s, sid, nva, count, st ? &dp : NULL);
    free(nva);
    if (st) st->id = sid;
    return rv;
}

int tc_submit_headers(tc_session *ts, int32_t sid, const char *block, size_t len,
                      size_t count, int end_stream) {
    nghttp2_nv *nva = unpack(block, len, count);
    if (!nva) return NGHTTP2_ERR_INVALID_ARGUMENT;
    int rv = nghttp2_submit_headers(ts->s, end_stream ? NGHTTP2_FLAG_END_STREAM : 0, sid, NULL,
                                    nva, count, NULL);
    free(nva);
    return rv;
}

static void resume(tc_session *ts, tc_stream *st) {
    if (st->deferred && st->id > 0) {
        st->deferred = 0;
        nghttp2_session_resume_data(ts->s, st->id);
    }
}

int tc_write(tc_session *ts, tc_stream *st, const uint8_t *data, size_t len) {
    if (st->off && st->len + len > st->cap) {
        memmove(st->p, st->p + st->off, st->len - st->off);
        st->len -= st->off; st->off = 0;
    }
    if (st->len + len > st->cap) {
        size_t cap = st->cap ? st->cap : 4096;
        while (cap < st->len + len) cap *= 2;
        uint8_t *p = realloc(st->p, cap);
        if (!p) return NGHTTP2_ERR_NOMEM;
        st->p = p; st->cap = cap;
    }
    memcpy(st->p + st->len, data, len);
    st->len += len;
    resume(ts, st);
    return 0;
}

int tc_end(tc_session *ts, tc_stream *st, const char *trailers, size_t len, size_t count) {
    st->eof = 1;
    if (trailers && count) {
        st->trailers = malloc(len ? len : 1);
        if (!st->trailers) return NGHTTP2_ERR_NOMEM;
        memcpy(st->trailers, trailers, len);
        st->tlen = len; st->tcount = count;
    }
    resume(ts, st);
    return 0;
}

size_t tc_buffered(tc_stream *st) { return st->len - st->off; }
void tc_notify_below(tc_stream *st, size_t mark) { st->mark = mark; st->notify = 1; }

int tc_consume(tc_session *ts, int32_t sid, size_t n) {
    int rv = nghttp2_session_consume(ts->s, sid, n);
    /* The stream is gone: what it held still counts against the connection window. */
    if (rv == NGHTTP2_ERR_INVALID_ARGUMENT) return nghttp2_session_consume_connection(ts->s, n);
    return rv;
}
int tc_consume_connection(tc_session *ts, size_t n) {
    return nghttp2_session_consume_connection(ts->s, n);
}
int tc_reset(tc_session *ts, int32_t sid, uint32_t code) {
    return nghttp2_submit_rst_stream(ts->s, NGHTTP2_FLAG_NONE, sid, code);
}
int tc_goaway(tc_session *ts, uint32_t code) {
    return nghttp2_submit_goaway(ts->s, NGHTTP2_FLAG_NONE,
                                 nghttp2_session_get_last_proc_stream_id(ts->s), code, NULL, 0);
}
int tc_terminate(tc_session *ts, uint32_t code) {
    return nghttp2_session_terminate_session(ts->s, code);
}
uint32_t tc_remote_max_streams(tc_session *ts) {
    return nghttp2_session_get_remote_settings(ts->s, NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS);
}
int tc_ping(tc_session *ts) { return nghttp2_submit_ping(ts->s, NGHTTP2_FLAG_NONE, NULL); }
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "sidecar.proxy.http2._nghttp2", SOURCE, libraries=["nghttp2"], extra_compile_args=["-O2"]
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
