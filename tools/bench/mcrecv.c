/*
 * mcrecv: join a multicast group and count what mcsend.c sent in one trial.
 *
 * Counts received, unique, duplicate and reordered datagrams of trial TRIAL (others
 * are "foreign": stragglers of an earlier trial), and the socket's own overflow drops
 * (SO_RXQ_OVFL) so the harness can tell loss in the path from loss in this receiver.
 * The receive buffer is raised with SO_RCVBUFFORCE (root), which does not need the
 * global net.core.rmem_max to be changed.
 *
 * Prints {"ready": true} once joined, then one JSON result object when it has all
 * EXPECT packets, or IDLE seconds after the last packet, or WAIT seconds with none.
 * With -H it only holds the membership (so the group stays joined across trials) and
 * sleeps until killed.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <getopt.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAGIC 0x4d434d57u
#define VLEN 64
#define BUFSZ 2048

struct hdr {
    uint32_t magic;
    uint32_t trial;
    uint64_t seq;
};

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static double cpu_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void usage(void)
{
    fprintf(stderr, "usage: mcrecv -g GROUP -p PORT [-i IFADDR] [-T TRIAL] [-n EXPECT] "
                    "[-B RCVBUF] [-w WAIT_S] [-I IDLE_S] [-H]\n");
    exit(2);
}

int main(int argc, char **argv)
{
    const char *group = NULL, *ifaddr = NULL;
    int port = 0, hold = 0, rcvbuf = 8 << 20;
    uint32_t trial = 0;
    uint64_t expect = 0;
    double wait_s = 10.0, idle_s = 0.5;
    int c;
    while ((c = getopt(argc, argv, "g:p:i:T:n:B:w:I:H")) != -1) {
        switch (c) {
        case 'g': group = optarg; break;
        case 'p': port = atoi(optarg); break;
        case 'i': ifaddr = optarg; break;
        case 'T': trial = (uint32_t)strtoul(optarg, NULL, 0); break;
        case 'n': expect = strtoull(optarg, NULL, 10); break;
        case 'B': rcvbuf = atoi(optarg); break;
        case 'w': wait_s = atof(optarg); break;
        case 'I': idle_s = atof(optarg); break;
        case 'H': hold = 1; break;
        default: usage();
        }
    }
    if (!group || (!hold && (port <= 0 || expect == 0)))
        usage();

    int fd = socket(AF_INET, SOCK_DGRAM, 0);
    if (fd < 0) { perror("socket"); return 1; }
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &rcvbuf, sizeof rcvbuf) < 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof rcvbuf);
    setsockopt(fd, SOL_SOCKET, SO_RXQ_OVFL, &one, sizeof one);
    struct sockaddr_in local = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    /* Bind to the group, not INADDR_ANY, so only this group's traffic is counted. */
    if (inet_pton(AF_INET, group, &local.sin_addr) != 1) usage();
    if (bind(fd, (struct sockaddr *)&local, sizeof local) < 0) { perror("bind"); return 1; }
    struct ip_mreqn mreq = {.imr_multiaddr = local.sin_addr};
    if (ifaddr && inet_pton(AF_INET, ifaddr, &mreq.imr_address) != 1) usage();
    if (setsockopt(fd, IPPROTO_IP, IP_ADD_MEMBERSHIP, &mreq, sizeof mreq) < 0) {
        perror("IP_ADD_MEMBERSHIP");
        return 1;
    }
    int actual = 0;
    socklen_t alen = sizeof actual;
    getsockopt(fd, SOL_SOCKET, SO_RCVBUF, &actual, &alen);
    printf("{\"ready\": true, \"rcvbuf\": %d}\n", actual);
    fflush(stdout);
    if (hold) {
        for (;;) pause();
    }

    /* A 100 ms receive timeout lets the loop check the idle and wait deadlines. */
    struct timeval tv = {.tv_sec = 0, .tv_usec = 100000};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);

    uint8_t *seen = calloc((size_t)(expect + 7) / 8, 1);
    if (!seen) { perror("calloc"); return 1; }
    static unsigned char bufs[VLEN][BUFSZ];
    static char ctrl[VLEN][CMSG_SPACE(sizeof(uint32_t))];
    struct mmsghdr msgs[VLEN];
    struct iovec iov[VLEN];

    uint64_t received = 0, unique = 0, dups = 0, reordered = 0, foreign = 0, bytes = 0;
    uint64_t max_seq = 0, t_first = 0, t_last = 0;
    uint32_t ovfl = 0;
    int have_max = 0;
    uint64_t start = now_ns();
    double cpu0 = cpu_s();
    for (;;) {
        memset(msgs, 0, sizeof msgs);
        for (int i = 0; i < VLEN; i++) {
            iov[i].iov_base = bufs[i];
            iov[i].iov_len = BUFSZ;
            msgs[i].msg_hdr.msg_iov = &iov[i];
            msgs[i].msg_hdr.msg_iovlen = 1;
            msgs[i].msg_hdr.msg_control = ctrl[i];
            msgs[i].msg_hdr.msg_controllen = sizeof ctrl[i];
        }
        int n = recvmmsg(fd, msgs, VLEN, MSG_WAITFORONE, NULL);
        uint64_t now = now_ns();
        if (n < 0) {
            if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
                perror("recvmmsg");
                return 1;
            }
            if (t_first ? (now - t_last) / 1e9 >= idle_s : (now - start) / 1e9 >= wait_s)
                break;
            continue;
        }
        for (int i = 0; i < n; i++) {
            struct msghdr *mh = &msgs[i].msg_hdr;
            for (struct cmsghdr *cm = CMSG_FIRSTHDR(mh); cm; cm = CMSG_NXTHDR(mh, cm))
                if (cm->cmsg_level == SOL_SOCKET && cm->cmsg_type == SO_RXQ_OVFL)
                    memcpy(&ovfl, CMSG_DATA(cm), sizeof ovfl);
            struct hdr h;
            if (msgs[i].msg_len < sizeof h) { foreign++; continue; }
            memcpy(&h, bufs[i], sizeof h);
            if (h.magic != MAGIC || h.trial != trial || h.seq >= expect) { foreign++; continue; }
            received++;
            bytes += msgs[i].msg_len;
            if (!t_first) t_first = now;
            t_last = now;
            if (seen[h.seq >> 3] & (1u << (h.seq & 7))) { dups++; continue; }
            seen[h.seq >> 3] |= (uint8_t)(1u << (h.seq & 7));
            unique++;
            if (have_max && h.seq < max_seq) reordered++;
            if (!have_max || h.seq > max_seq) { max_seq = h.seq; have_max = 1; }
        }
        if (unique >= expect) break;
        if (!t_first && (now - start) / 1e9 >= wait_s) break;
        if (t_first && (now - t_last) / 1e9 >= idle_s) break;
    }
    printf("{\"received\": %llu, \"unique\": %llu, \"duplicates\": %llu, \"reordered\": %llu, "
           "\"foreign\": %llu, \"bytes\": %llu, \"socket_drops\": %u, \"rcvbuf\": %d, "
           "\"t_first_ns\": %llu, \"t_last_ns\": %llu, \"cpu_s\": %.6f}\n",
           (unsigned long long)received, (unsigned long long)unique, (unsigned long long)dups,
           (unsigned long long)reordered, (unsigned long long)foreign,
           (unsigned long long)bytes, ovfl, actual, (unsigned long long)t_first,
           (unsigned long long)t_last, cpu_s() - cpu0);
    return 0;
}
