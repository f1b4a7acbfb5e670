// Maps every typed core error to one Python exception, in one place:
//
//   pe::InvalidArgument  -> ValueError
//   pe::IoError          -> OSError(errno, message, path)  (FileNotFoundError, ... by errno)
//   pe::CheckpointError  -> pyengine.CheckpointError
//   pe::DataError        -> pyengine.DataError
//   std::bad_alloc       -> MemoryError (pybind11's default)
#include <exception>

#include "bindings.h"
#include "common/errors.h"

namespace py = pybind11;

namespace pe::bindings {
namespace {

void set_pyengine_error(const char* name, const char* what) {
  py::object type = py::module_::import("pyengine.errors").attr(name);
  PyErr_SetString(type.ptr(), what);
}

}  // namespace

void bind_errors(py::module_& /*m*/) {
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const pe::InvalidArgument& e) {
      PyErr_SetString(PyExc_ValueError, e.what());
    } catch (const pe::IoError& e) {
      py::tuple args = py::make_tuple(e.error_number(), e.what(), e.path());
      PyErr_SetObject(PyExc_OSError, args.ptr());
    } catch (const pe::CheckpointError& e) {
      set_pyengine_error("CheckpointError", e.what());
    } catch (const pe::DataError& e) {
      set_pyengine_error("DataError", e.what());
    }
  });
}

}  // namespace pe::bindings
