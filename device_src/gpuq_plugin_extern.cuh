// gpuq_plugin_extern.cuh -- the processing function as a link-time symbol: the ABI of a
// *precompiled* plugin (LTO-IR, PTX, CUBIN, fatbin or an nvcc -dc object; gpuq_driver/plugins.py,
// Plugin.from_object).
//
// For such a plugin the kernels (gpuq_queue.cu, gpuq_batch.cu) are compiled by NVRTC as relocatable
// LTO-IR (-rdc=true -dlto) with this header in place of a plugin's source (GPUQ_PLUGIN_FILE), and
// nvJitLink links them with the plugin's object into the CUBIN that is loaded.  The plugin defines
// the function declared here, with C linkage (extern "C": the symbol is plain `gpuq_process`, the
// same whichever compiler and <cstdint> spell uint64_t), and otherwise obeys the contract in
// plugins/echo.cuh.  Include this header in the plugin's .cu so that the compiler checks the
// definition against the declaration:
//
//   #include "gpuq_plugin_extern.cuh"     // nvcc -I <gpuq_driver's device_src>
//   extern "C" __device__ uint32_t gpuq_process(const uint8_t* __restrict__ in, uint32_t len,
//                                               uint8_t* __restrict__ out, uint32_t out_cap,
//                                               uint64_t msg_id, uint32_t lane) { ... }
//
// Since the kernel is compiled with -rdc, the extern __device__ symbols that the kernel defines
// for plugins are linkable from the plugin's object too: this header includes the plugin API
// (gpuq_plugin_api.cuh: gpuq_params(), gpuq_params_bytes(), GPUQ_FAIL(code)).
#pragma once

#include "gpuq_plugin_api.cuh"  // also the integer types

extern "C" __device__ uint32_t gpuq_process(const uint8_t* __restrict__ in, uint32_t len,
                                            uint8_t* __restrict__ out, uint32_t out_cap, uint64_t msg_id,
                                            uint32_t lane);
