/*
 * ef_client: a C client of the edgefleet agent, written from docs/protocol.md alone.
 *
 *   cc -O2 -Wall -Wextra -o ef_client ef_client.c
 *   ./ef_client /run/edgefleet/agent.sock [REQUESTS] [UNTIL_SEQUENCE]
 *
 * Reads `info` (JSON) to learn n_features, then screens synthetic dies (every parameter 1.0,
 * one missing), alternating binary PREDICT frames and JSON lines on one connection, and
 * prints one line per answer:
 *
 *   binary seq=1 version=1.0.0 die=4 decision=pass score=0.8 threshold=3
 *   json seq=1 die=5 decision=pass
 *
 * It follows the model when it changes under the connection (a rollout): a new
 * model_sequence in an answer, or a bad_width error, makes it read `info` again and go on
 * with the new width. It runs REQUESTS requests (default 100), and past that until it has
 * been answered by a model with sequence >= UNTIL_SEQUENCE (default 0: no wait), then 10
 * more. Exit status: 0 when every answer was consistent, 1 otherwise, 2 for bad usage.
 *
 * What it shows a C integrator: the header as fields copied in little-endian order (no
 * struct casts into the stream, so alignment never matters), MSG_NOSIGNAL on every send,
 * reading exact lengths, k and version_len read from every RESULT, float32 comparison of
 * score and threshold.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

enum { HEADER_SIZE = 24, PREDICT = 1, RESULT = 2, ERROR = 3, BAD_WIDTH = 4 };
static const uint8_t MAGIC[4] = {0x89, 'E', 'F', 'P'};

static int fd = -1;
static uint32_t n_features;
static uint64_t last_sequence = UINT64_MAX;
static int failures;

static void put_u32(uint8_t *p, uint32_t v) { for (int i = 0; i < 4; i++) p[i] = v >> (8 * i); }
static void put_u64(uint8_t *p, uint64_t v) { for (int i = 0; i < 8; i++) p[i] = v >> (8 * i); }
static uint16_t get_u16(const uint8_t *p) { return (uint16_t)(p[0] | p[1] << 8); }
static uint32_t get_u32(const uint8_t *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}
static uint64_t get_u64(const uint8_t *p) { return get_u32(p) | (uint64_t)get_u32(p + 4) << 32; }
static float get_f32(const uint8_t *p) { uint32_t u = get_u32(p); float f; memcpy(&f, &u, 4); return f; }

static void die(const char *what) { perror(what); exit(1); }

static void send_all(const void *buf, size_t len) {
    const uint8_t *p = buf;
    while (len) {
        ssize_t n = send(fd, p, len, MSG_NOSIGNAL); /* EPIPE as an error, not a signal */
        if (n < 0) { if (errno == EINTR) continue; die("send"); }
        p += n; len -= (size_t)n;
    }
}

static void recv_all(void *buf, size_t len) {
    uint8_t *p = buf;
    while (len) {
        ssize_t n = recv(fd, p, len, 0);
        if (n == 0) { fprintf(stderr, "ef_client: the agent closed the connection\n"); exit(1); }
        if (n < 0) { if (errno == EINTR) continue; die("recv"); }
        p += n; len -= (size_t)n;
    }
}

/* One answer line (JSON), NUL-terminated, newline stripped; the caller frees it. */
static char *recv_line(void) {
    size_t cap = 4096, len = 0;
    char *line = malloc(cap);
    for (;;) {
        if (len + 1 == cap) line = realloc(line, cap *= 2);
        recv_all(line + len, 1);
        if (line[len] == '\n') { line[len] = 0; return line; }
        len++;
    }
}

/* The number after "key": in a JSON answer (enough for the agent's flat answers), or NAN. */
static double json_number(const char *line, const char *key) {
    char pat[64];
    snprintf(pat, sizeof pat, "\"%s\":", key);
    const char *p = strstr(line, pat);
    return p && strncmp(p + strlen(pat), "null", 4) ? strtod(p + strlen(pat), NULL) : NAN;
}

static void json_word(const char *line, const char *key, char *out, size_t size) {
    char pat[64];
    snprintf(pat, sizeof pat, "\"%s\":\"", key);
    const char *p = strstr(line, pat);
    out[0] = 0;
    if (p) {
        p += strlen(pat);
        size_t n = strcspn(p, "\"");
        if (n >= size) n = size - 1;
        memcpy(out, p, n);
        out[n] = 0;
    }
}

static void read_info(void) {
    send_all("{\"op\":\"info\"}\n", 14);
    char *line = recv_line();
    double n = json_number(line, "n_features");
    if (isnan(n) || n < 1) { fprintf(stderr, "ef_client: no model: %s\n", line); exit(1); }
    n_features = (uint32_t)n;
    printf("info n_features=%u\n", n_features);
    free(line);
}

static void saw_sequence(uint64_t seq) {
    if (seq != last_sequence) {
        if (last_sequence != UINT64_MAX) read_info(); /* the model changed: learn it again */
        last_sequence = seq;
    }
}

static void binary_request(uint64_t die_id, uint32_t tag) {
    size_t payload = 8 + 4 * (size_t)n_features;
    uint8_t *frame = calloc(1, HEADER_SIZE + payload);
    memcpy(frame, MAGIC, 4);
    frame[4] = 1;       /* version */
    frame[5] = PREDICT; /* type; flags stay 0 */
    put_u32(frame + 8, tag);
    put_u32(frame + 12, 1); /* rows */
    put_u32(frame + 16, n_features);
    put_u32(frame + 20, (uint32_t)payload);
    put_u64(frame + 24, die_id);
    for (uint32_t i = 0; i < n_features; i++) {
        float v = i == 1 ? NAN : 1.0f; /* NaN: a missing measurement */
        memcpy(frame + 32 + 4 * i, &v, 4);
    }
    send_all(frame, HEADER_SIZE + payload);
    free(frame);

    uint8_t h[HEADER_SIZE];
    recv_all(h, HEADER_SIZE);
    uint32_t length = get_u32(h + 20);
    uint8_t *p = malloc(length + 1);
    recv_all(p, length);
    if (memcmp(h, MAGIC, 4) || get_u32(h + 8) != tag) {
        fprintf(stderr, "ef_client: answer header mismatch\n");
        exit(1);
    }
    if (h[5] == ERROR) {
        uint16_t code = get_u16(p);
        p[length] = 0;
        printf("binary error code=%u message=%s\n", code, (char *)p + 12);
        if (code == BAD_WIDTH) read_info(); /* the model changed under us */
        else failures++;
        free(p);
        return;
    }
    uint32_t k = get_u32(h + 16); /* read from every RESULT: it changes with the model */
    uint64_t seq = get_u64(p + 8);
    uint16_t vlen = get_u16(p + 16);
    char version[256] = {0};
    memcpy(version, p + 24, vlen < 255 ? vlen : 255);
    const uint8_t *rec = p + 24 + ((vlen + 7u) & ~7u);
    uint8_t decision = rec[8];
    float score = get_f32(rec + 20), threshold = get_f32(rec + 24);
    if (get_u64(rec) != die_id || get_u32(h + 12) != 1 || length != 24 + ((vlen + 7u) & ~7u)
                                                                         + 32 + 8 * k) {
        fprintf(stderr, "ef_client: malformed RESULT\n");
        failures++;
    } else if (decision < 2 && (decision == 1) != (score > threshold)) { /* float32 compare */
        fprintf(stderr, "ef_client: decision %u disagrees with score %g > %g\n", decision,
                score, threshold);
        failures++;
    }
    printf("binary seq=%llu version=%s die=%llu decision=%s score=%g threshold=%g\n",
           (unsigned long long)seq, version, (unsigned long long)die_id,
           decision == 0 ? "pass" : decision == 1 ? "fail" : "error", score, threshold);
    free(p);
    saw_sequence(seq);
}

static void json_request(uint64_t die_id) {
    size_t cap = 64 + 4 * (size_t)n_features, len = 0;
    char *line = malloc(cap);
    len += (size_t)sprintf(line, "{\"die_id\":%llu,\"params\":[", (unsigned long long)die_id);
    for (uint32_t i = 0; i < n_features; i++)
        len += (size_t)sprintf(line + len, "%s%s", i ? "," : "", i == 1 ? "null" : "1");
    len += (size_t)sprintf(line + len, "]}\n");
    send_all(line, len);
    free(line);
    char *answer = recv_line(), code[32], decision[16];
    json_word(answer, "code", code, sizeof code);
    json_word(answer, "decision", decision, sizeof decision);
    if (code[0]) {
        printf("json error code=%s\n", code);
        if (!strcmp(code, "bad_width")) read_info();
        else failures++;
    } else {
        double seq = json_number(answer, "model_sequence");
        printf("json seq=%.0f die=%llu decision=%s\n", seq, (unsigned long long)die_id,
               decision);
        if (json_number(answer, "die_id") != (double)die_id) failures++;
        saw_sequence((uint64_t)seq);
    }
    free(answer);
}

int main(int argc, char **argv) {
    if (argc < 2 || argc > 4) {
        fprintf(stderr, "usage: ef_client SOCKET [REQUESTS] [UNTIL_SEQUENCE]\n");
        return 2;
    }
    long requests = argc > 2 ? atol(argv[2]) : 100;
    uint64_t until = argc > 3 ? strtoull(argv[3], NULL, 10) : 0;
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    if (strlen(argv[1]) >= sizeof addr.sun_path) { fprintf(stderr, "path too long\n"); return 2; }
    strcpy(addr.sun_path, argv[1]);
    fd = socket(AF_UNIX, SOCK_STREAM, 0);
    if (fd < 0 || connect(fd, (struct sockaddr *)&addr, sizeof addr) < 0) die("connect");
    setvbuf(stdout, NULL, _IOLBF, 0);
    read_info();
    long extra = -1;
    for (long i = 0; i < 1000000; i++) {
        if (i >= requests && extra < 0 && (until == 0 || (last_sequence != UINT64_MAX
                                                          && last_sequence >= until)))
            extra = 10;
        if (extra == 0) break;
        if (extra > 0) extra--;
        if (i % 2) json_request((uint64_t)i);
        else binary_request((uint64_t)i, (uint32_t)i + 1);
    }
    close(fd);
    printf("done failures=%d\n", failures);
    return failures ? 1 : 0;
}
