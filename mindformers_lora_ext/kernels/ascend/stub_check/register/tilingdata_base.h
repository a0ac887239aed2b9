// STUB for a host-side 'g++ -fsyntax-only' check of ../op_host and ../op_kernel (see ../stub_check/README.md).
// NOT the CANN header of the same name; never used by the real build (build.sh).
#pragma once
#include <cstdint>
#include <cstddef>
#define BEGIN_TILING_DATA_DEF(name) class name { public:
#define TILING_DATA_FIELD_DEF(type, f) type f{}; void set_##f(type v) { f = v; } type get_##f() const { return f; }
#define TILING_DATA_FIELD_DEF_STRUCT(type, f) type f;
#define END_TILING_DATA_DEF \
    void SaveToBuffer(void *p, size_t cap) const { (void)p; (void)cap; } \
    size_t GetDataSize() const { return 0; } }
#define REGISTER_TILING_DATA_CLASS(op, cls) static_assert(sizeof(cls) > 0, #op);
