#include "bindings.h"

PYBIND11_MODULE(_core, m) {
  m.doc() = "pyengine's C++ core (private: use the pyengine package).";
  pe::bindings::bind_errors(m);
  pe::bindings::bind_checkpoint(m);
  pe::bindings::bind_data(m);
  pe::bindings::bind_image(m);
}
