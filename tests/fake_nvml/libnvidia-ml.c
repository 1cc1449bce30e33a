/* A stand-in for libnvidia-ml.so.1 on machines without a driver: only nvmlInit* and nvmlErrorString.
 * It lets the tests drive the real child-process probe (nvidia-ml-py + ctypes + our timeout) into the
 * failures a real driver produces.  FAKE_NVML_INIT: "hang" sleeps forever; a number is returned as the
 * NVML error code (e.g. 4 = NoPermission, 18 = LibRmVersionMismatch); "cvd" answers Unknown (999) when
 * CUDA_VISIBLE_DEVICES is set at all and LibraryNotFound (12) otherwise, so a test can see whether the probe
 * really runs without it. */
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static int init_result(void) {
    const char *mode = getenv("FAKE_NVML_INIT");
    if (mode && strcmp(mode, "cvd") == 0) {
        return getenv("CUDA_VISIBLE_DEVICES") ? 999 : 12;
    }
    if (mode && strcmp(mode, "hang") == 0) {
        for (;;) sleep(60);
    }
    return mode ? atoi(mode) : 12;
}

int nvmlInitWithFlags(unsigned int flags) { (void)flags; return init_result(); }
int nvmlInit_v2(void) { return init_result(); }
int nvmlInit(void) { return init_result(); }
int nvmlShutdown(void) { return 0; }
const char *nvmlErrorString(int result) {
    switch (result) {
    case 4: return "Insufficient Permissions";
    case 9: return "Driver Not Loaded";
    case 18: return "RM has detected an NVML/RM version mismatch.";
    default: return "Unknown Error";
    }
}
