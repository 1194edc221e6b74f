/*
 * relay: the minimal C relay mcmw is measured against. Same shape as an mcmw node,
 * none of its features:
 *
 *   TAP --read() per frame--> keep IPv4 multicast (not 224.0.0.0/24), TTL - 1 with an
 *   incremental checksum (RFC 1624) --> to the peer relay
 *   from the peer --> prepend Ethernet (01:00:5e + low 23 bits of the group, fixed
 *   source MAC) --write() per frame--> TAP
 *
 * Transports:
 *   udp          one sendto() per packet, one recv() per packet (the c-relay mode)
 *   udp-auth     the same, every datagram authenticated as mcmw authenticates its own:
 *                a 32-byte head (as long as mcmw's IP-Data head and Integrity object
 *                head together; a 64-bit sequence number in it), the packet, and an
 *                HMAC-SHA256 of both under a key from the environment (RELAY_KEY), with
 *                the key's padded blocks hashed once, as mcmw does; the receiver checks
 *                the HMAC and refuses replays in a 64-datagram window (the
 *                c-relay-auth mode: the cost of the same crypto in C)
 *   tcp-dial,    a TCP stream with mcmw's IP-Data framing (20-byte COPS header, packet,
 *   tcp-accept   padding to 32 bits), TCP_NODELAY, one send() per wake-up carrying every
 *                frame read in it, as mcmw does; it isolates what TCP costs from what
 *                Python costs (the c-relay-tcp mode)
 *
 * No batching syscalls (recvmmsg/sendmmsg) on purpose: one syscall per packet per
 * direction is the floor the mcmw design also aims at.
 *
 * The relay creates the TAP (IFF_TAP | IFF_NO_PI) and prints {"ready": true} once its
 * peer socket is set up; the harness then gives the TAP an address, routes and
 * sysctls. On SIGTERM/SIGINT it prints its counters as JSON and exits (the TAP goes
 * away with the fd).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/if.h>
#include <linux/if_tun.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <openssl/crypto.h>
#include <openssl/evp.h>

#define FRAME_MAX 2048
#define BATCH 64 /* frames per wake-up per direction, so neither side starves the other */
#define HDR 20   /* mcmw's IP-Data header: COPS common header + object header + 8 bytes */
#define TX_CAP (4 << 20)  /* bytes queued for a slow TCP peer before dropping, as mcmw */
#define RX_SIZE (256 << 10)

enum transport { UDP, UDP_AUTH, TCP_DIAL, TCP_ACCEPT };

#define AUTH_HEAD 32
#define DIGEST 32

/* HMAC-SHA256 (RFC 2104) with the key's inner and outer padded blocks hashed once. */
static EVP_MD_CTX *mac_inner, *mac_outer, *mac_work;

static int mac_init(const char *key)
{
    unsigned char ipad[64], opad[64];
    size_t len = strlen(key);
    if (len < 16 || len > 64) return -1;
    memset(ipad, 0x36, sizeof ipad);
    memset(opad, 0x5c, sizeof opad);
    for (size_t i = 0; i < len; i++) {
        ipad[i] ^= (unsigned char)key[i];
        opad[i] ^= (unsigned char)key[i];
    }
    mac_inner = EVP_MD_CTX_new();
    mac_outer = EVP_MD_CTX_new();
    mac_work = EVP_MD_CTX_new();
    if (!mac_inner || !mac_outer || !mac_work) return -1;
    if (!EVP_DigestInit_ex(mac_inner, EVP_sha256(), NULL) || !EVP_DigestUpdate(mac_inner, ipad, 64) ||
        !EVP_DigestInit_ex(mac_outer, EVP_sha256(), NULL) || !EVP_DigestUpdate(mac_outer, opad, 64))
        return -1;
    return 0;
}

static void mac(const unsigned char *msg, size_t len, unsigned char out[DIGEST])
{
    unsigned char inner[DIGEST];
    unsigned int n;
    EVP_MD_CTX_copy_ex(mac_work, mac_inner);
    EVP_DigestUpdate(mac_work, msg, len);
    EVP_DigestFinal_ex(mac_work, inner, &n);
    EVP_MD_CTX_copy_ex(mac_work, mac_outer);
    EVP_DigestUpdate(mac_work, inner, DIGEST);
    EVP_DigestFinal_ex(mac_work, out, &n);
}

static volatile sig_atomic_t stop;
static void on_signal(int sig) { (void)sig; stop = 1; }

static int parse_addr(const char *s, struct sockaddr_in *out)
{
    char host[64];
    const char *colon = strrchr(s, ':');
    if (!colon || (size_t)(colon - s) >= sizeof host) return -1;
    memcpy(host, s, (size_t)(colon - s));
    host[colon - s] = 0;
    memset(out, 0, sizeof *out);
    out->sin_family = AF_INET;
    out->sin_port = htons((uint16_t)atoi(colon + 1));
    return inet_pton(AF_INET, host, &out->sin_addr) == 1 ? 0 : -1;
}

static int open_tap(const char *name)
{
    int fd = open("/dev/net/tun", O_RDWR | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0) return -1;
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    ifr.ifr_flags = IFF_TAP | IFF_NO_PI;
    strncpy(ifr.ifr_name, name, IFNAMSIZ - 1);
    if (ioctl(fd, TUNSETIFF, &ifr) < 0) { close(fd); return -1; }
    return fd;
}

static void big_buffers(int fd)
{
    /* Big buffers on the peer socket, like the receiver's: loss should come from the
     * relay not keeping up, not from a default-sized queue absorbing a burst. */
    int big = 4 << 20;
    setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &big, sizeof big);
    setsockopt(fd, SOL_SOCKET, SO_SNDBUFFORCE, &big, sizeof big);
}

/* Keep a frame read from the TAP if it is IPv4 multicast beyond 224.0.0.0/24 with TTL
 * > 1, decrementing the TTL; returns the IP packet length or 0 to skip the frame. */
static size_t take_packet(unsigned char *frame, ssize_t n)
{
    unsigned char *ip = frame + 14;
    if (n < 34 || frame[12] != 0x08 || frame[13] != 0x00 || (ip[0] >> 4) != 4 ||
        (ip[16] & 0xf0) != 0xe0 || (ip[16] == 224 && ip[17] == 0 && ip[18] == 0) || ip[8] <= 1)
        return 0;
    /* TTL is the high byte of header word 4: TTL - 1 lowers the one's-complement sum by
     * 0x0100, so the checksum rises by 0x0100 (end-around carry). */
    ip[8]--;
    uint32_t sum = (uint32_t)((ip[10] << 8) | ip[11]) + 0x0100;
    sum = (sum & 0xffff) + (sum >> 16);
    ip[10] = (unsigned char)(sum >> 8);
    ip[11] = (unsigned char)sum;
    return (size_t)n - 14;
}

static const unsigned char src_mac[6] = {0x02, 0x6d, 0x63, 0x6d, 0x77, 0x01};

/* Write the IP packet at frame + 14 to the TAP behind its multicast Ethernet header. */
static int to_tap(int tap, unsigned char *frame, size_t len)
{
    unsigned char *ip = frame + 14;
    frame[0] = 0x01; frame[1] = 0x00; frame[2] = 0x5e;
    frame[3] = ip[17] & 0x7f; frame[4] = ip[18]; frame[5] = ip[19];
    memcpy(frame + 6, src_mac, 6);
    frame[12] = 0x08; frame[13] = 0x00;
    return write(tap, frame, len + 14) < 0 ? -1 : 0;
}

int main(int argc, char **argv)
{
    enum transport tr = UDP;
    if (argc == 5 && strcmp(argv[4], "tcp-dial") == 0) tr = TCP_DIAL;
    else if (argc == 5 && strcmp(argv[4], "udp-auth") == 0) tr = UDP_AUTH;
    else if (argc == 5 && strcmp(argv[4], "tcp-accept") == 0) tr = TCP_ACCEPT;
    else if (!(argc == 4 || (argc == 5 && strcmp(argv[4], "udp") == 0))) {
        fprintf(stderr, "usage: relay TAPNAME LISTEN_IP:PORT PEER_IP:PORT [udp|udp-auth|tcp-dial|tcp-accept]\n");
        return 2;
    }
    struct sockaddr_in listen_at, peer;
    if (parse_addr(argv[2], &listen_at) < 0 || parse_addr(argv[3], &peer) < 0) {
        fprintf(stderr, "relay: bad address\n");
        return 2;
    }
    if (tr == UDP_AUTH && (!getenv("RELAY_KEY") || mac_init(getenv("RELAY_KEY")) < 0)) {
        fprintf(stderr, "relay: udp-auth needs RELAY_KEY, 16 to 64 characters\n");
        return 2;
    }
    int tap = open_tap(argv[1]);
    if (tap < 0) { perror("relay: tap"); return 1; }

    int sock = -1, lsock = -1, one = 1;
    if (tr == UDP || tr == UDP_AUTH) {
        sock = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        big_buffers(sock);
        if (sock < 0 || bind(sock, (struct sockaddr *)&listen_at, sizeof listen_at) < 0) {
            perror("relay: udp");
            return 1;
        }
    } else if (tr == TCP_ACCEPT) {
        lsock = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        setsockopt(lsock, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        if (lsock < 0 || bind(lsock, (struct sockaddr *)&listen_at, sizeof listen_at) < 0 ||
            listen(lsock, 1) < 0) {
            perror("relay: listen");
            return 1;
        }
    } else {
        /* The accepting relay is started first; retry for a few seconds regardless. */
        for (int tries = 0; sock < 0 && tries < 50; tries++) {
            sock = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
            big_buffers(sock);
            if (connect(sock, (struct sockaddr *)&peer, sizeof peer) == 0) break;
            close(sock);
            sock = -1;
            struct timespec ts = {0, 100000000};
            nanosleep(&ts, NULL);
        }
        if (sock < 0) { perror("relay: connect"); return 1; }
        fcntl(sock, F_SETFL, O_NONBLOCK);
        setsockopt(sock, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    }
    struct sigaction sa = {.sa_handler = on_signal};
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    printf("{\"ready\": true}\n");
    fflush(stdout);

    /* Frames are built in place: a packet from the peer is put at frame + 14 and the
     * Ethernet header is written in front of it. */
    static unsigned char frame[FRAME_MAX];
    static unsigned char txbuf[TX_CAP + FRAME_MAX], rxbuf[RX_SIZE];
    size_t tx_len = 0, rx_len = 0;
    unsigned long long tap_in = 0, sent = 0, skipped = 0, peer_in = 0, tap_out = 0;
    unsigned long long errors = 0, dropped_queue = 0, dropped_auth = 0;
    static unsigned char sealed[AUTH_HEAD + FRAME_MAX + DIGEST];
    uint64_t tx_seq = 0, rx_top = 0, rx_seen = 0; /* rx_seen: bit i = rx_top - i arrived */

    while (!stop) {
        struct pollfd pfd[2] = {{.fd = tap, .events = POLLIN},
                                {.fd = sock >= 0 ? sock : lsock, .events = POLLIN}};
        if (tr >= TCP_DIAL && sock >= 0 && tx_len) pfd[1].events |= POLLOUT;
        if (poll(pfd, 2, 200) < 0) {
            if (errno == EINTR) continue;
            perror("relay: poll");
            return 1;
        }
        if (sock < 0) { /* tcp-accept: waiting for the dialer */
            if (pfd[1].revents & POLLIN) {
                sock = accept4(lsock, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
                if (sock >= 0) {
                    big_buffers(sock);
                    setsockopt(sock, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                }
            }
            while (read(tap, frame, sizeof frame) >= 0) /* nobody to send to yet */
                tap_in++, skipped++;
            continue;
        }

        /* TAP -> peer */
        for (int i = 0; i < BATCH; i++) {
            ssize_t n = read(tap, frame, sizeof frame);
            if (n < 0) break; /* EAGAIN: drained */
            tap_in++;
            size_t len = take_packet(frame, n);
            if (!len) { skipped++; continue; }
            if (tr == UDP_AUTH) {
                memset(sealed, 0, AUTH_HEAD);
                tx_seq++;
                for (int b = 0; b < 8; b++) sealed[b] = (unsigned char)(tx_seq >> (56 - 8 * b));
                memcpy(sealed + AUTH_HEAD, frame + 14, len);
                mac(sealed, AUTH_HEAD + len, sealed + AUTH_HEAD + len);
                if (sendto(sock, sealed, AUTH_HEAD + len + DIGEST, 0, (struct sockaddr *)&peer,
                           sizeof peer) < 0)
                    errors++;
                else
                    sent++;
                continue;
            }
            if (tr == UDP) {
                if (sendto(sock, frame + 14, len, 0, (struct sockaddr *)&peer, sizeof peer) < 0)
                    errors++;
                else
                    sent++;
                continue;
            }
            size_t total = HDR + ((len + 3) & ~(size_t)3);
            if (tx_len + total > TX_CAP) { dropped_queue++; continue; }
            unsigned char *m = txbuf + tx_len;
            memset(m, 0, HDR);
            m[0] = 0x10; m[1] = 3; m[2] = 0x8c; m[3] = 0xa5; /* COPS v1, IP-Data, mcmw */
            m[4] = (unsigned char)(total >> 24); m[5] = (unsigned char)(total >> 16);
            m[6] = (unsigned char)(total >> 8); m[7] = (unsigned char)total;
            memcpy(m + HDR, frame + 14, len);
            memset(m + HDR + len, 0, total - HDR - len);
            tx_len += total;
            sent++;
        }
        if (tr >= TCP_DIAL && tx_len) { /* one send() for everything this wake-up read */
            ssize_t w = send(sock, txbuf, tx_len, MSG_NOSIGNAL);
            if (w > 0) {
                memmove(txbuf, txbuf + w, tx_len - (size_t)w);
                tx_len -= (size_t)w;
            } else if (w < 0 && errno != EAGAIN) {
                errors++;
            }
        }

        /* peer -> TAP */
        if (tr == UDP_AUTH) {
            for (int i = 0; i < BATCH; i++) {
                ssize_t n = recv(sock, rxbuf, sizeof rxbuf, 0);
                if (n < 0) break;
                peer_in++;
                if (n < AUTH_HEAD + 20 + DIGEST || n > AUTH_HEAD + FRAME_MAX - 14 + DIGEST) {
                    skipped++;
                    continue;
                }
                size_t len = (size_t)n - AUTH_HEAD - DIGEST;
                unsigned char expected[DIGEST];
                mac(rxbuf, AUTH_HEAD + len, expected);
                uint64_t seq = 0;
                for (int b = 0; b < 8; b++) seq = seq << 8 | rxbuf[b];
                if (CRYPTO_memcmp(expected, rxbuf + AUTH_HEAD + len, DIGEST) != 0) {
                    dropped_auth++;
                    continue;
                }
                if (seq > rx_top) {
                    rx_seen = seq - rx_top >= 64 ? 1 : rx_seen << (seq - rx_top) | 1;
                    rx_top = seq;
                } else if (rx_top - seq >= 64 || rx_seen >> (rx_top - seq) & 1) {
                    dropped_auth++; /* a replay, or too old to tell */
                    continue;
                } else {
                    rx_seen |= 1ULL << (rx_top - seq);
                }
                memcpy(frame + 14, rxbuf + AUTH_HEAD, len);
                if ((frame[14] >> 4) != 4) { skipped++; continue; }
                if (to_tap(tap, frame, len) < 0) errors++; else tap_out++;
            }
            continue;
        }
        if (tr == UDP) {
            for (int i = 0; i < BATCH; i++) {
                ssize_t n = recv(sock, frame + 14, sizeof frame - 14, 0);
                if (n < 0) break;
                peer_in++;
                if (n < 20 || (frame[14] >> 4) != 4) { skipped++; continue; }
                if (to_tap(tap, frame, (size_t)n) < 0) errors++; else tap_out++;
            }
            continue;
        }
        ssize_t n = recv(sock, rxbuf + rx_len, sizeof rxbuf - rx_len, 0);
        if (n == 0) break; /* peer closed */
        if (n < 0) continue;
        rx_len += (size_t)n;
        size_t off = 0;
        while (rx_len - off >= HDR) {
            unsigned char *m = rxbuf + off;
            size_t total = ((size_t)m[4] << 24) | ((size_t)m[5] << 16) | ((size_t)m[6] << 8) | m[7];
            if (total < HDR + 20 || total > FRAME_MAX) { fprintf(stderr, "relay: bad frame\n"); return 1; }
            if (rx_len - off < total) break;
            size_t len = ((size_t)m[HDR + 2] << 8) | m[HDR + 3]; /* IP total length */
            if (len > total - HDR) len = total - HDR;
            peer_in++;
            memcpy(frame + 14, m + HDR, len);
            if (to_tap(tap, frame, len) < 0) errors++; else tap_out++;
            off += total;
        }
        memmove(rxbuf, rxbuf + off, rx_len - off);
        rx_len -= off;
    }
    printf("{\"tap_in\": %llu, \"sent\": %llu, \"peer_in\": %llu, \"tap_out\": %llu, "
           "\"skipped\": %llu, \"errors\": %llu, \"dropped_queue\": %llu, \"dropped_auth\": %llu}\n",
           tap_in, sent, peer_in, tap_out, skipped, errors, dropped_queue, dropped_auth);
    return 0;
}
