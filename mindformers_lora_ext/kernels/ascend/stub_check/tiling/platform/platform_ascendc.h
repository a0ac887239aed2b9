// STUB for a host-side 'g++ -fsyntax-only' check of ../op_host and ../op_kernel (see ../stub_check/README.md).
// NOT the CANN header of the same name; never used by the real build (build.sh).
#pragma once
#include <cstdint>
namespace fe { struct PlatFormInfos; }
namespace platform_ascendc {
class PlatformAscendC {
public:
    explicit PlatformAscendC(fe::PlatFormInfos *p) { (void)p; }
    uint32_t GetCoreNumAiv() const { return 40; }
    uint32_t GetCoreNumAic() const { return 20; }
    uint32_t GetLibApiWorkSpaceSize() const { return 16u << 20; }
};
}
