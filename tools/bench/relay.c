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

#define FRAME_MAX 2048
#define BATCH 64 /* frames per wake-up per direction, so neither side starves the other */
#define HDR 20   /* mcmw's IP-Data header: COPS common header + object header + 8 bytes */
#define TX_CAP (4 << 20)  /* bytes queued for a slow TCP peer before dropping, as mcmw */
#define RX_SIZE (256 << 10)

enum transport { UDP, TCP_DIAL, TCP_ACCEPT };

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
    else if (argc == 5 && strcmp(argv[4], "tcp-accept") == 0) tr = TCP_ACCEPT;
    else if (!(argc == 4 || (argc == 5 && strcmp(argv[4], "udp") == 0))) {
        fprintf(stderr, "usage: relay TAPNAME LISTEN_IP:PORT PEER_IP:PORT [udp|tcp-dial|tcp-accept]\n");
        return 2;
    }
    struct sockaddr_in listen_at, peer;
    if (parse_addr(argv[2], &listen_at) < 0 || parse_addr(argv[3], &peer) < 0) {
        fprintf(stderr, "relay: bad address\n");
        return 2;
    }
    int tap = open_tap(argv[1]);
    if (tap < 0) { perror("relay: tap"); return 1; }

    int sock = -1, lsock = -1, one = 1;
    if (tr == UDP) {
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
    unsigned long long errors = 0, dropped_queue = 0;

    while (!stop) {
        struct pollfd pfd[2] = {{.fd = tap, .events = POLLIN},
                                {.fd = sock >= 0 ? sock : lsock, .events = POLLIN}};
        if (tr != UDP && sock >= 0 && tx_len) pfd[1].events |= POLLOUT;
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
        if (tr != UDP && tx_len) { /* one send() for everything this wake-up read */
            ssize_t w = send(sock, txbuf, tx_len, MSG_NOSIGNAL);
            if (w > 0) {
                memmove(txbuf, txbuf + w, tx_len - (size_t)w);
                tx_len -= (size_t)w;
            } else if (w < 0 && errno != EAGAIN) {
                errors++;
            }
        }

        /* peer -> TAP */
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
           "\"skipped\": %llu, \"errors\": %llu, \"dropped_queue\": %llu}\n",
           tap_in, sent, peer_in, tap_out, skipped, errors, dropped_queue);
    return 0;
}
