// The only place in csrc that includes pybind11: each file binds one part of the core.
#pragma once

#include <pybind11/pybind11.h>

namespace pe::bindings {

void bind_errors(pybind11::module_& m);
void bind_checkpoint(pybind11::module_& m);
void bind_data(pybind11::module_& m);
void bind_image(pybind11::module_& m);

}  // namespace pe::bindings
