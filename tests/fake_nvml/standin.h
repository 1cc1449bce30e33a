/* Shared by the stand-in driver libraries: the devices a recorded machine has, read from an environment
 * variable as "NAME|MAJOR.MINOR|TOTAL_MIB;NAME|...".  The tests write it from the recorded machines in tests/fixtures/nvml. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define STANDIN_MAX_DEVICES 16

struct standin_device { char name[96]; int major, minor; unsigned long long total_mib; };

static int standin_devices(const char *variable, struct standin_device *out) {
    const char *spec = getenv(variable);
    int n = 0;
    while (spec && *spec && n < STANDIN_MAX_DEVICES) {
        const char *end = strchr(spec, ';');
        size_t len = end ? (size_t)(end - spec) : strlen(spec);
        char item[160];
        if (len >= sizeof item) len = sizeof item - 1;
        memcpy(item, spec, len);
        item[len] = 0;
        char *bar = strchr(item, '|');
        if (bar) {
            *bar = 0;
            strncpy(out[n].name, item, sizeof out[n].name - 1);
            out[n].name[sizeof out[n].name - 1] = 0;
            out[n].major = out[n].minor = 0;
            out[n].total_mib = 0;
            sscanf(bar + 1, "%d.%d|%llu", &out[n].major, &out[n].minor, &out[n].total_mib);
            n++;
        }
        spec = end ? end + 1 : NULL;
    }
    return n;
}

/* "hang" sleeps forever (a hung driver); a number is returned as the call's result; unset: `otherwise`. */
static int standin_result(const char *variable, int otherwise) {
    const char *mode = getenv(variable);
    if (mode && strcmp(mode, "hang") == 0) {
        for (;;) sleep(60);
    }
    return mode && *mode ? atoi(mode) : otherwise;
}
