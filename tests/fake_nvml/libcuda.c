/* A stand-in for libcuda.so.1 (the CUDA driver API) on machines without a driver: the calls conda and rattler use
 * for __cuda and __cuda_arch, and the ones lorastrap's libcuda probe makes.  Answers come from the environment:
 *   FAKE_CUDA_INIT     cuInit's result: a CUresult number (e.g. 100 = CUDA_ERROR_NO_DEVICE, 803 =
 *                      CUDA_ERROR_SYSTEM_DRIVER_MISMATCH), or "hang"; unset = 0 (success)
 *   FAKE_CUDA_VERSION  what cuDriverGetVersion writes (1000*major + 10*minor, e.g. 12060)
 *   FAKE_CUDA_DEVICES  "NAME|MAJOR.MINOR|TOTAL_MIB;..."
 * Like the real library, every call but cuDriverGetVersion fails with CUDA_ERROR_NOT_INITIALIZED (3) before a
 * successful cuInit. */
#include "standin.h"

#define CUDA_ERROR_INVALID_VALUE 1
#define CUDA_ERROR_NOT_INITIALIZED 3
#define CUDA_ERROR_INVALID_DEVICE 101
#define ATTR_CC_MAJOR 75
#define ATTR_CC_MINOR 76

/* Every per-device call: fails before cuInit, and for an ordinal that is not there. */
#define CHECK_DEVICE(d) do { \
        if (!initialised) return CUDA_ERROR_NOT_INITIALIZED; \
        if ((d) < 0 || (d) >= device_count) return CUDA_ERROR_INVALID_DEVICE; \
    } while (0)

static int initialised;
static struct standin_device devices[STANDIN_MAX_DEVICES];
static int device_count;

int cuInit(unsigned int flags) {
    (void)flags;
    int rc = standin_result("FAKE_CUDA_INIT", 0);
    if (rc == 0) {
        device_count = standin_devices("FAKE_CUDA_DEVICES", devices);
        initialised = 1;
    }
    return rc;
}

int cuDriverGetVersion(int *version) {
    if (!version) return CUDA_ERROR_INVALID_VALUE;
    *version = standin_result("FAKE_CUDA_VERSION", 0);
    return 0;
}

int cuDeviceGetCount(int *count) {
    if (!initialised) return CUDA_ERROR_NOT_INITIALIZED;
    *count = device_count;
    return 0;
}

int cuDeviceGet(int *device, int ordinal) {
    if (!initialised) return CUDA_ERROR_NOT_INITIALIZED;
    if (ordinal < 0 || ordinal >= device_count) return CUDA_ERROR_INVALID_DEVICE;
    *device = ordinal;
    return 0;
}

int cuDeviceGetName(char *name, int len, int device) {
    CHECK_DEVICE(device);
    snprintf(name, (size_t)len, "%s", devices[device].name);
    return 0;
}

int cuDeviceComputeCapability(int *major, int *minor, int device) {
    CHECK_DEVICE(device);
    *major = devices[device].major;
    *minor = devices[device].minor;
    return 0;
}

int cuDeviceGetAttribute(int *value, int attribute, int device) {
    CHECK_DEVICE(device);
    if (attribute == ATTR_CC_MAJOR) { *value = devices[device].major; return 0; }
    if (attribute == ATTR_CC_MINOR) { *value = devices[device].minor; return 0; }
    return CUDA_ERROR_INVALID_VALUE;
}

int cuDeviceTotalMem_v2(size_t *bytes, int device) {
    CHECK_DEVICE(device);
    *bytes = (size_t)devices[device].total_mib * 1024 * 1024;
    return 0;
}

int cuDeviceTotalMem(size_t *bytes, int device) { return cuDeviceTotalMem_v2(bytes, device); }

int cuGetErrorName(int error, const char **name) {
    switch (error) {
    case 0: *name = "CUDA_SUCCESS"; return 0;
    case 3: *name = "CUDA_ERROR_NOT_INITIALIZED"; return 0;
    case 100: *name = "CUDA_ERROR_NO_DEVICE"; return 0;
    case 803: *name = "CUDA_ERROR_SYSTEM_DRIVER_MISMATCH"; return 0;
    default: *name = "CUDA_ERROR_UNKNOWN"; return 0;
    }
}
