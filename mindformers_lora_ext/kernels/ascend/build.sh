#!/usr/bin/env bash
# Build (and optionally install) the LoraFused / LoraFusedGrad AscendC custom-op package.
#
# NEEDS the CANN toolkit (Ascend-cann-toolkit, with the AscendC compiler) and an Ascend
# 910B / 910_93 target. It has NOT been run yet: the project's machines have no CANN.
#
# Environment:
#   ASCEND_HOME_PATH        CANN install, e.g. /usr/local/Ascend/ascend-toolkit/latest
#                           (set by `source <cann>/set_env.sh`); ASCEND_CANN_PACKAGE_PATH
#                           is accepted as a fallback.
#   LORA_FUSED_SOC          target SoCs, ';'-separated (default "ascend910b;ascend910_93")
#   LORA_FUSED_VENDOR       vendor name of the package (default "lora_ext")
#   LORA_FUSED_BUILD_DIR    scratch directory (default: ${TMPDIR:-/tmp}/lora_fused_build)
#   LORA_FUSED_INSTALL_PATH install the package there (e.g. $ASCEND_OPP_PATH); otherwise
#                           only build, and print the ASCEND_CUSTOM_OPP_PATH to export
#   PYTHON                  python with mindspore 2.9 installed (default python3)
#
# Flows:
#   ./build.sh            MindSpore's documented flow: mindspore/lib/plugin/ascend/custom_compiler
#                         (setup.py -o op_host -k op_kernel), which instantiates the CANN
#                         custom-op project template and builds the .run package.
#   ./build.sh --msopgen  CANN's flow: msopgen gen -i lora_fused.json -c ai_core-<soc> -lan cpp,
#                         copy op_host/ op_kernel/ into the generated project, run its build.sh.
# After installing, MindSpore finds the ops through ASCEND_CUSTOM_OPP_PATH
# (…/vendors/<vendor>); mindformers_lora_ext.kernels.ascend.is_available() checks for them.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
MODE="mindspore"
if [ "${1:-}" = "--msopgen" ]; then
    MODE="msopgen"
elif [ -n "${1:-}" ]; then
    echo "usage: $0 [--msopgen]" >&2
    exit 64
fi

CANN="${ASCEND_HOME_PATH:-${ASCEND_CANN_PACKAGE_PATH:-}}"
if [ -z "${CANN}" ] || [ ! -d "${CANN}" ]; then
    cat >&2 <<'MSG'
build.sh: CANN toolkit not found, nothing built.
  This package needs the Ascend CANN toolkit (AscendC compiler, op project templates).
  Install CANN, then `source <cann>/set_env.sh` (sets ASCEND_HOME_PATH) and rerun.
  Without the package, mindformers_lora_ext.kernels.ascend.is_available() stays False.
MSG
    exit 2
fi
if [ ! -d "${CANN}/tools/op_project_templates/ascendc" ] && \
   [ ! -d "${CANN}/tools/msopgen/template/operator_demo_projects/ascendc_operator_sample" ]; then
    echo "build.sh: ${CANN} has no AscendC op project template (tools/op_project_templates/ascendc);" \
         "is it a CANN *toolkit* install?" >&2
    exit 2
fi

SOC="${LORA_FUSED_SOC:-ascend910b;ascend910_93}"
VENDOR="${LORA_FUSED_VENDOR:-lora_ext}"
WORK="${LORA_FUSED_BUILD_DIR:-${TMPDIR:-/tmp}/lora_fused_build}"
PY="${PYTHON:-python3}"
mkdir -p "${WORK}"

if [ "${MODE}" = "mindspore" ]; then
    MS_DIR="$("${PY}" -c 'import os, mindspore; print(os.path.dirname(mindspore.__file__))')"
    COMPILER="${MS_DIR}/lib/plugin/ascend/custom_compiler"
    if [ ! -f "${COMPILER}/setup.py" ]; then
        echo "build.sh: ${COMPILER}/setup.py not found (needs mindspore >= 2.3 with the Ascend plugin)" >&2
        exit 2
    fi
    # setup.py creates CustomProject/ next to itself: work on a private copy
    rm -rf "${WORK}/custom_compiler"
    cp -r "${COMPILER}" "${WORK}/custom_compiler"
    ARGS=(-o "${HERE}/op_host" -k "${HERE}/op_kernel" --vendor_name "${VENDOR}"
          --ascend_cann_package_path "${CANN}" --soc_version "${SOC}")
    if [ -n "${LORA_FUSED_INSTALL_PATH:-}" ]; then
        ARGS+=(-i --install_path "${LORA_FUSED_INSTALL_PATH}")
    fi
    (cd "${WORK}/custom_compiler" && "${PY}" setup.py "${ARGS[@]}")
    OUT="${WORK}/custom_compiler/CustomProject/build_out"
else
    if ! command -v msopgen >/dev/null 2>&1; then
        echo "build.sh: msopgen not on PATH (source <cann>/set_env.sh)" >&2
        exit 2
    fi
    PROJ="${WORK}/LoraFusedProject"
    rm -rf "${PROJ}"
    FIRST_SOC="${SOC%%;*}"
    msopgen gen -i "${HERE}/lora_fused.json" -c "ai_core-${FIRST_SOC}" -lan cpp -out "${PROJ}"
    # replace the generated stubs by the real sources
    rm -f "${PROJ}"/op_host/*.cpp "${PROJ}"/op_host/*.h "${PROJ}"/op_kernel/*.cpp "${PROJ}"/op_kernel/*.h
    cp "${HERE}"/op_host/*.cpp "${HERE}"/op_host/*.h "${PROJ}/op_host/"
    cp "${HERE}"/op_kernel/*.cpp "${HERE}"/op_kernel/*.h "${PROJ}/op_kernel/"
    "${PY}" - "${PROJ}/CMakePresets.json" "${CANN}" "${VENDOR}" "${SOC}" <<'PYEOF'
import json, sys
path, cann, vendor, soc = sys.argv[1:5]
with open(path, encoding="utf-8") as f:
    data = json.load(f)
cache = data["configurePresets"][0]["cacheVariables"]
cache["ASCEND_CANN_PACKAGE_PATH"]["value"] = cann
cache["vendor_name"]["value"] = vendor
cache["ASCEND_COMPUTE_UNIT"]["value"] = soc
with open(path, "w", encoding="utf-8") as f:
    json.dump(data, f, indent=4)
PYEOF
    (cd "${PROJ}" && ASCEND_HOME_PATH="${CANN}" bash build.sh)
    OUT="${PROJ}/build_out"
    if [ -n "${LORA_FUSED_INSTALL_PATH:-}" ]; then
        bash "$(ls "${OUT}"/*.run | head -n 1)" --install-path="${LORA_FUSED_INSTALL_PATH}"
    fi
fi

echo "build.sh: package built under ${OUT}"
if [ -n "${LORA_FUSED_INSTALL_PATH:-}" ]; then
    echo "export ASCEND_CUSTOM_OPP_PATH=${LORA_FUSED_INSTALL_PATH}/vendors/${VENDOR}:\${ASCEND_CUSTOM_OPP_PATH:-}"
else
    echo "install with: bash ${OUT}/<custom_opp_*.run> [--install-path=DIR], then"
    echo "export ASCEND_CUSTOM_OPP_PATH=<DIR or \$ASCEND_OPP_PATH>/vendors/${VENDOR}:\${ASCEND_CUSTOM_OPP_PATH:-}"
fi
