// What the MindSpore AOT ABI names in our entry points' signatures, shared by the .cc files.
#ifndef MINDFORMERS_LORA_EXT_AOT_ABI_H_
#define MINDFORMERS_LORA_EXT_AOT_ABI_H_

#include <vector>

#define FLK_API extern "C" __attribute__((visibility("default")))

class AotExtra;  // MindSpore's attribute accessor: unused, only named in the infer signatures

// MindSpore's TypeId is `enum TypeId : int` (mindapi/base/type_id.h). Our *InferType functions
// only pass input types through to outputs, so no enumerator value is needed here.
enum MsTypeId : int {};
typedef std::vector<MsTypeId> MsTypeIds;

#endif  // MINDFORMERS_LORA_EXT_AOT_ABI_H_
