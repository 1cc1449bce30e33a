/* A stand-in for libnvidia-ml.so.1 on machines without a driver.  It lets the tests drive the real child-process
 * probe (nvidia-ml-py + ctypes + our timeout), and py-rattler's own __cuda detection, through the answers a real
 * driver gives.  Answers come from the environment:
 *   FAKE_NVML_INIT     nvmlInit's result: an NVML error code (e.g. 4 = NoPermission, 18 = LibRmVersionMismatch),
 *                      "hang" (sleeps forever), or "cvd" (Unknown = 999 when CUDA_VISIBLE_DEVICES is set at all,
 *                      LibraryNotFound = 12 otherwise, so a test can see whether the probe runs without it);
 *                      unset = 12
 *   FAKE_NVML_DRIVER   nvmlSystemGetDriverVersion's answer (e.g. "550.127.05")
 *   FAKE_NVML_CUDA     nvmlSystemGetCudaDriverVersion{,_v2}'s answer (e.g. 12040); unset = NotSupported
 *   FAKE_NVML_DEVICES  "NAME|MAJOR.MINOR|TOTAL_MIB;..."
 * As with the real library, queries before a successful nvmlInit fail with Uninitialized (1). */
#include "standin.h"

#define NVML_ERROR_UNINITIALIZED 1
#define NVML_ERROR_INVALID_ARGUMENT 2
#define NVML_ERROR_NOT_SUPPORTED 3
#define NVML_ERROR_INSUFFICIENT_SIZE 7

static int initialised;
static struct standin_device devices[STANDIN_MAX_DEVICES];
static int device_count;

static int init_result(void) {
    const char *mode = getenv("FAKE_NVML_INIT");
    int rc;
    if (mode && strcmp(mode, "cvd") == 0) {
        rc = getenv("CUDA_VISIBLE_DEVICES") ? 999 : 12;
    } else {
        rc = standin_result("FAKE_NVML_INIT", 12);
    }
    if (rc == 0) {
        device_count = standin_devices("FAKE_NVML_DEVICES", devices);
        initialised = 1;
    }
    return rc;
}

int nvmlInitWithFlags(unsigned int flags) { (void)flags; return init_result(); }
int nvmlInit_v2(void) { return init_result(); }
int nvmlInit(void) { return init_result(); }
int nvmlShutdown(void) { initialised = 0; return 0; }

const char *nvmlErrorString(int result) {
    switch (result) {
    case 1: return "Uninitialized";
    case 3: return "Not Supported";
    case 4: return "Insufficient Permissions";
    case 9: return "Driver Not Loaded";
    case 12: return "NVML Shared Library Not Found";
    case 18: return "RM has detected an NVML/RM version mismatch.";
    default: return "Unknown Error";
    }
}

static int copy_text(char *out, unsigned int length, const char *text) {
    if (strlen(text) + 1 > length) return NVML_ERROR_INSUFFICIENT_SIZE;
    snprintf(out, length, "%s", text);
    return 0;
}

int nvmlSystemGetDriverVersion(char *version, unsigned int length) {
    if (!initialised) return NVML_ERROR_UNINITIALIZED;
    const char *driver = getenv("FAKE_NVML_DRIVER");
    return driver ? copy_text(version, length, driver) : NVML_ERROR_NOT_SUPPORTED;
}

int nvmlSystemGetCudaDriverVersion_v2(int *version) {
    if (!initialised) return NVML_ERROR_UNINITIALIZED;
    int value = standin_result("FAKE_NVML_CUDA", -1);
    if (value < 0) return NVML_ERROR_NOT_SUPPORTED;
    *version = value;
    return 0;
}

int nvmlSystemGetCudaDriverVersion(int *version) { return nvmlSystemGetCudaDriverVersion_v2(version); }

int nvmlDeviceGetCount_v2(unsigned int *count) {
    if (!initialised) return NVML_ERROR_UNINITIALIZED;
    *count = (unsigned int)device_count;
    return 0;
}

int nvmlDeviceGetCount(unsigned int *count) { return nvmlDeviceGetCount_v2(count); }

/* A device handle is its index + 1 (never NULL). */
static int device_index(void *handle) {
    long index = (long)handle - 1;
    return index >= 0 && index < device_count ? (int)index : -1;
}

int nvmlDeviceGetHandleByIndex_v2(unsigned int index, void **handle) {
    if (!initialised) return NVML_ERROR_UNINITIALIZED;
    if ((int)index >= device_count) return NVML_ERROR_INVALID_ARGUMENT;
    *handle = (void *)(long)(index + 1);
    return 0;
}

int nvmlDeviceGetHandleByIndex(unsigned int index, void **handle) {
    return nvmlDeviceGetHandleByIndex_v2(index, handle);
}

int nvmlDeviceGetName(void *handle, char *name, unsigned int length) {
    int i = device_index(handle);
    if (!initialised) return NVML_ERROR_UNINITIALIZED;
    return i < 0 ? NVML_ERROR_INVALID_ARGUMENT : copy_text(name, length, devices[i].name);
}

int nvmlDeviceGetUUID(void *handle, char *uuid, unsigned int length) {
    int i = device_index(handle);
    char text[64];
    if (!initialised) return NVML_ERROR_UNINITIALIZED;
    if (i < 0) return NVML_ERROR_INVALID_ARGUMENT;
    snprintf(text, sizeof text, "GPU-00000000-0000-4000-8000-%012d", i);
    return copy_text(uuid, length, text);
}

int nvmlDeviceGetCudaComputeCapability(void *handle, int *major, int *minor) {
    int i = device_index(handle);
    if (!initialised) return NVML_ERROR_UNINITIALIZED;
    if (i < 0) return NVML_ERROR_INVALID_ARGUMENT;
    *major = devices[i].major;
    *minor = devices[i].minor;
    return 0;
}

struct memory { unsigned long long total, free, used; };

int nvmlDeviceGetMemoryInfo(void *handle, struct memory *memory) {
    int i = device_index(handle);
    if (!initialised) return NVML_ERROR_UNINITIALIZED;
    if (i < 0) return NVML_ERROR_INVALID_ARGUMENT;
    memory->total = devices[i].total_mib * 1024 * 1024;
    memory->free = memory->total;
    memory->used = 0;
    return 0;
}

int nvmlDeviceGetArchitecture(void *handle, unsigned int *arch) {
    (void)handle; (void)arch;
    return initialised ? NVML_ERROR_NOT_SUPPORTED : NVML_ERROR_UNINITIALIZED;
}

int nvmlDeviceGetMigMode(void *handle, unsigned int *current, unsigned int *pending) {
    (void)handle; (void)current; (void)pending;
    return initialised ? NVML_ERROR_NOT_SUPPORTED : NVML_ERROR_UNINITIALIZED;
}
