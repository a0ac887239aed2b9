// STUB for a host-side 'g++ -fsyntax-only' check of ../op_host and ../op_kernel (see ../stub_check/README.md).
// NOT the CANN header of the same name; never used by the real build (build.sh).
#pragma once
