/*
 * loadgen: an open-loop HTTP/1.1 load generator for Kingpost's benchmarks.
 *
 * wrk measures saturation well, but its delay() pacing has whole-millisecond
 * steps and a closed loop hides queueing (coordinated omission); hey's rate
 * mode reports in 0.1 ms steps. This sends requests on a fixed schedule
 * (constant spacing, or Poisson with -P) whatever the server does, over C
 * keep-alive connections with at most one request in flight each, and times
 * every response from the moment its request was *due*, so a request that
 * waited for a free connection is charged for the wait.
 *
 *   loadgen -h HOST -p PORT -c CONNS -r RATE -d SECONDS [-w WARMUP] [-P] REQUEST_FILE
 *
 * REQUEST_FILE holds the raw request bytes (head and body). Responses must
 * carry Content-Length or be chunked (a chunked body ends at the first
 * "\r\n0\r\n\r\n": no trailers). Prints one JSON object: counts, the
 * rate achieved and latency percentiles in milliseconds (1 us resolution).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

#define HIST_US 2000000 /* 1 us buckets up to 2 s; slower goes to the last one */
#define QUEUE_CAP (1u << 22)

struct conn {
    int fd;
    int busy;
    uint64_t due_ns;
    size_t sent;
    char *buf;
    size_t len, cap;
};

static const char *host = "127.0.0.1";
static int port, nconns = 1, poisson;
static double rate = 1000, seconds = 5, warmup = 1;
static char *request;
static size_t request_len;
static uint32_t *hist;
static uint64_t completed, answered, non2xx, errors, dropped, reconnects, unfinished, overflow, max_us;

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void die(const char *what) {
    perror(what);
    exit(2);
}

static int open_conn(int ep, int index) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0) die("socket");
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    if (inet_pton(AF_INET, host, &addr.sin_addr) != 1) {
        fprintf(stderr, "loadgen: -h must be an IPv4 address, got %s\n", host);
        exit(2);
    }
    if (connect(fd, (struct sockaddr *)&addr, sizeof addr) < 0) die("connect");
    if (fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK) < 0) die("fcntl");
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (uint32_t)index};
    if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev) < 0) die("epoll_ctl");
    return fd;
}

static void record(uint64_t us) {
    if (us > max_us) max_us = us;
    if (us >= HIST_US) overflow++;
    hist[us > HIST_US ? HIST_US : us]++;
}

/* Replace connection i by a new one; a request in flight on it is lost (an error). */
static void reconnect(int ep, struct conn *c, int i, int *idle, int *nidle) {
    epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    c->fd = open_conn(ep, i);
    c->len = 0;
    c->sent = request_len;
    reconnects++;
    if (c->busy) {
        errors++;
        c->busy = 0;
        idle[(*nidle)++] = i;
    }
}

/* Write what is left of the request; 1 when all of it went out. */
static int push(int ep, int index, struct conn *c) {
    while (c->sent < request_len) {
        ssize_t n = write(c->fd, request + c->sent, request_len - c->sent);
        if (n < 0) {
            if (errno == EAGAIN) {
                struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT, .data.u32 = (uint32_t)index};
                epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
                return 0;
            }
            return -1;
        }
        c->sent += (size_t)n;
    }
    return 1;
}

/* Length of a complete response at the start of buf, 0 if more bytes are needed, -1 if unparsable. */
static long response_length(const char *buf, size_t len, int *status, int *closing) {
    const char *end = memmem(buf, len, "\r\n\r\n", 4);
    if (end == NULL) return 0;
    size_t head = (size_t)(end - buf) + 4;
    if (len < 12 || strncmp(buf, "HTTP/1.", 7) != 0) return -1;
    *status = atoi(buf + 9);
    long body = 0;
    int chunked = 0;
    for (const char *p = buf; p < end;) {
        const char *eol = memmem(p, (size_t)(end - p) + 2, "\r\n", 2);
        if (eol == NULL) break;
        if (eol - p > 11 && strncasecmp(p, "connection:", 11) == 0) {
            char value[64] = {0};
            size_t n = (size_t)(eol - p) - 11;
            memcpy(value, p + 11, n < sizeof value - 1 ? n : sizeof value - 1);
            if (strcasestr(value, "close") != NULL) *closing = 1;
        }
        if (eol - p > 15 && strncasecmp(p, "content-length:", 15) == 0) body = strtol(p + 15, NULL, 10);
        if (eol - p > 18 && strncasecmp(p, "transfer-encoding:", 18) == 0) chunked = 1;
        p = eol + 2;
    }
    if (chunked) {
        const char *fin = memmem(end, len - (size_t)(end - buf), "\r\n0\r\n\r\n", 7);
        return fin == NULL ? 0 : (long)(fin - buf) + 7;
    }
    return len >= head + (size_t)body ? (long)(head + (size_t)body) : 0;
}

static double percentile(uint64_t total, double q) {
    uint64_t want = (uint64_t)ceil(q * (double)total), seen = 0;
    if (want == 0) want = 1;
    for (uint32_t us = 0; us <= HIST_US; us++) {
        seen += hist[us];
        if (seen >= want) return us / 1000.0;
    }
    return HIST_US / 1000.0;
}

int main(int argc, char **argv) {
    int opt;
    while ((opt = getopt(argc, argv, "h:p:c:r:d:w:P")) != -1) {
        switch (opt) {
        case 'h': host = optarg; break;
        case 'p': port = atoi(optarg); break;
        case 'c': nconns = atoi(optarg); break;
        case 'r': rate = atof(optarg); break;
        case 'd': seconds = atof(optarg); break;
        case 'w': warmup = atof(optarg); break;
        case 'P': poisson = 1; break;
        default:
            fprintf(stderr, "usage: %s -p PORT [-h HOST] [-c CONNS] [-r RATE] [-d SECONDS] "
                            "[-w WARMUP] [-P] REQUEST_FILE\n", argv[0]);
            return 2;
        }
    }
    if (optind != argc - 1 || port <= 0 || nconns <= 0 || rate <= 0 || seconds <= 0) {
        fprintf(stderr, "loadgen: need -p PORT, positive -c/-r/-d and one REQUEST_FILE\n");
        return 2;
    }
    signal(SIGPIPE, SIG_IGN); /* a reset connection is an error to count, not a crash */
    FILE *f = fopen(argv[optind], "rb");
    if (f == NULL) die(argv[optind]);
    fseek(f, 0, SEEK_END);
    request_len = (size_t)ftell(f);
    rewind(f);
    request = malloc(request_len);
    if (fread(request, 1, request_len, f) != request_len) die("fread");
    fclose(f);
    hist = calloc(HIST_US + 1, sizeof *hist);
    uint64_t *queue = malloc(QUEUE_CAP * sizeof *queue);
    struct conn *conns = calloc((size_t)nconns, sizeof *conns);
    int *idle = malloc((size_t)nconns * sizeof *idle);
    int nidle = 0;

    int ep = epoll_create1(0);
    if (ep < 0) die("epoll_create1");
    int tfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK);
    if (tfd < 0) die("timerfd_create");
    struct epoll_event tev = {.events = EPOLLIN, .data.u32 = UINT32_MAX};
    epoll_ctl(ep, EPOLL_CTL_ADD, tfd, &tev);
    for (int i = 0; i < nconns; i++) {
        conns[i].fd = open_conn(ep, i);
        conns[i].cap = 65536;
        conns[i].buf = malloc(conns[i].cap);
        idle[nidle++] = i;
    }

    double mean_gap_ns = 1e9 / rate;
    unsigned short seed[3] = {1, 2, 3};
    uint64_t start = now_ns(), record_from = start + (uint64_t)(warmup * 1e9);
    uint64_t stop = record_from + (uint64_t)(seconds * 1e9);
    double next = (double)start;
    size_t qhead = 0, qlen = 0;
    struct epoll_event events[256];

    for (;;) {
        uint64_t now = now_ns();
        if (now >= stop) break;
        while (next <= (double)now) {
            if (qlen < QUEUE_CAP) {
                queue[(qhead + qlen) % QUEUE_CAP] = (uint64_t)next;
                qlen++;
            } else if ((uint64_t)next >= record_from) {
                dropped++;
            }
            next += poisson ? -log(1.0 - erand48(seed)) * mean_gap_ns : mean_gap_ns;
        }
        while (qlen > 0 && nidle > 0) {
            int i = idle[--nidle];
            struct conn *c = &conns[i];
            c->busy = 1;
            c->due_ns = queue[qhead];
            qhead = (qhead + 1) % QUEUE_CAP;
            qlen--;
            c->sent = 0;
            c->len = 0;
            if (push(ep, i, c) < 0) reconnect(ep, c, i, idle, &nidle);
        }
        struct itimerspec its = {0};
        uint64_t at = (uint64_t)next < stop ? (uint64_t)next : stop;
        its.it_value.tv_sec = (time_t)(at / 1000000000ull);
        its.it_value.tv_nsec = (long)(at % 1000000000ull);
        timerfd_settime(tfd, TFD_TIMER_ABSTIME, &its, NULL);
        int n = epoll_wait(ep, events, 256, -1);
        if (n < 0 && errno != EINTR) die("epoll_wait");
        for (int e = 0; e < n; e++) {
            uint32_t i = events[e].data.u32;
            if (i == UINT32_MAX) {
                uint64_t ticks;
                while (read(tfd, &ticks, sizeof ticks) > 0) {
                }
                continue;
            }
            struct conn *c = &conns[i];
            if ((events[e].events & EPOLLOUT) && c->sent < request_len) {
                int r = push(ep, (int)i, c);
                if (r < 0) {
                    reconnect(ep, c, (int)i, idle, &nidle);
                    continue;
                }
                if (r == 1) {
                    struct epoll_event ev = {.events = EPOLLIN, .data.u32 = i};
                    epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
                }
            }
            if (!(events[e].events & (EPOLLIN | EPOLLHUP | EPOLLERR))) continue;
            for (;;) {
                if (c->cap - c->len < 4096) {
                    c->cap *= 2;
                    c->buf = realloc(c->buf, c->cap);
                }
                ssize_t got = read(c->fd, c->buf + c->len, c->cap - c->len);
                if (got < 0 && errno == EINTR) continue;
                if (got < 0 && errno == EAGAIN) break;
                if (got <= 0) { /* closed or failed: count it and reconnect */
                    reconnect(ep, c, (int)i, idle, &nidle);
                    break;
                }
                c->len += (size_t)got;
                int status = 0, closing = 0;
                long whole = response_length(c->buf, c->len, &status, &closing);
                if (whole < 0) {
                    fprintf(stderr, "loadgen: unparsable response: %.60s\n", c->buf);
                    return 2;
                }
                if (whole == 0) continue; /* read on until EAGAIN */
                uint64_t done = now_ns();
                if (c->busy) answered++; /* warm-up included: what the server did in all */
                if (c->busy && c->due_ns >= record_from) {
                    record((done - c->due_ns) / 1000);
                    completed++;
                    if (status < 200 || status >= 300) non2xx++;
                }
                int was_busy = c->busy; /* an unasked response (e.g. a 408) frees nothing */
                c->busy = 0;
                c->len = 0;
                if (c->sent < request_len) { /* answered before the body was all sent */
                    c->sent = request_len;
                    struct epoll_event ev = {.events = EPOLLIN, .data.u32 = i};
                    epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
                }
                if (closing) reconnect(ep, c, (int)i, idle, &nidle); /* the server ends it */
                if (was_busy) idle[nidle++] = (int)i;
                break;
            }
        }
    }
    /* Requests still waiting at the end are the slowest of all: they count, at the time
       they have waited so far, so an overloaded run cannot report a flattering p99. */
    int inflight = 0;
    for (int i = 0; i < nconns; i++) {
        if (!conns[i].busy) continue;
        inflight++;
        if (conns[i].due_ns >= record_from) {
            record((stop - conns[i].due_ns) / 1000);
            unfinished++;
        }
    }
    for (size_t k = 0; k < qlen; k++) {
        uint64_t due = queue[(qhead + k) % QUEUE_CAP];
        if (due >= record_from && due < stop) {
            record((stop - due) / 1000);
            unfinished++;
        }
    }
    uint64_t total = 0;
    for (uint32_t us = 0; us <= HIST_US; us++) total += hist[us];
    printf("{\"completed\": %llu, \"answered\": %llu, \"rate\": %.1f, \"target_rate\": %.1f, \"connections\": %d, "
           "\"non2xx\": %llu, \"errors\": %llu, \"dropped\": %llu, \"backlog\": %zu, "
           "\"inflight\": %d, \"reconnects\": %llu, \"unfinished\": %llu, \"over_2s\": %llu, "
           "\"p50\": %.3f, \"p90\": %.3f, \"p99\": %.3f, \"p999\": %.3f, \"max\": %.3f}\n",
           (unsigned long long)completed, (unsigned long long)answered,
           (double)completed / seconds, rate, nconns,
           (unsigned long long)non2xx, (unsigned long long)errors, (unsigned long long)dropped,
           qlen, inflight, (unsigned long long)reconnects, (unsigned long long)unfinished,
           (unsigned long long)overflow, total ? percentile(total, 0.5) : 0, total ? percentile(total, 0.9) : 0,
           total ? percentile(total, 0.99) : 0, total ? percentile(total, 0.999) : 0,
           max_us / 1000.0);
    return 0;
}
