// Bindings for the checkpoint engine. Tensors cross as WriteSource (save) and TensorRead (restore)
// objects over 1-D byte buffers (the Python layer passes `tensor.view(torch.uint8).numpy()`), so the
// core never sees torch. Every call that copies, writes, reads or waits releases the GIL; the writer's
// waits do so in slices and check for signals between them, so Ctrl-C interrupts them.
//
// Lifetimes are owned here, at the boundary: a save's WriteSources (and so their buffers)
// stay referenced until the core reports its snapshot done, whatever Python does with its own
// references. Those references are dropped only with the GIL held, at the writer's next call
// or its destruction; the core's threads never see a Python object.
#include <pybind11/stl.h>
#include <pybind11/typing.h>

#include <map>

#include "bindings.h"
#include "checkpoint/async_writer.h"
#include "checkpoint/shard_reader.h"
#include "common/crc32c.h"
#include "common/errors.h"

namespace py = pybind11;

namespace pe::bindings {
namespace {

struct Bytes {
  uint8_t* data;
  uint64_t size;
};

void check_one_dimensional(const py::buffer_info& info) {
  if (info.ndim > 1 || (info.ndim == 1 && info.strides[0] != info.itemsize))
    throw pe::InvalidArgument("buffer must be one-dimensional and contiguous");
}

Bytes bytes_of(const py::buffer& buffer, bool writable) {
  py::buffer_info info = buffer.request(writable);
  check_one_dimensional(info);
  return Bytes{static_cast<uint8_t*>(info.ptr), static_cast<uint64_t>(info.size * info.itemsize)};
}

// A buffer request (Py_buffer, which references the exporter) held for the holder's whole life,
// so its pointer stays valid, and the exporter cannot resize it, while anything references the
// holder. Destroyed, like every Python object, only with the GIL held.
struct HeldBuffer {
  HeldBuffer(const py::buffer& buffer, bool writable) : exporter(buffer), view(buffer.request(writable)) {
    check_one_dimensional(view);
  }
  uint8_t* data() const { return static_cast<uint8_t*>(view.ptr); }
  uint64_t size() const { return static_cast<uint64_t>(view.size * view.itemsize); }

  py::object exporter;
  py::buffer_info view;
};

// One tensor to save: its data pointer stays valid while anything references the WriteSource.
class WriteSource {
 public:
  WriteSource(std::string name, std::string dtype, std::vector<int64_t> shape, const py::buffer& data)
      : buffer_(data, false) {
    source_.spec = TensorSpec{std::move(name), std::move(dtype), std::move(shape), buffer_.size()};
    source_.data = buffer_.data();
  }
  const TensorSource& source() const { return source_; }

 private:
  HeldBuffer buffer_;
  TensorSource source_;
};

// save() and reserve() share this. `keep` receives a new reference to every WriteSource, taken
// before the GIL is released: the caller's list may change meanwhile.
using SourceList = py::typing::List<WriteSource>;

std::vector<TensorSource> sources_of(const SourceList& sources, std::vector<py::object>* keep) {
  std::vector<TensorSource> out;
  out.reserve(sources.size());
  for (const py::handle& item : sources) {
    if (!py::isinstance<WriteSource>(item))
      throw py::type_error("sources must be WriteSource objects, got " +
                           std::string(py::str(py::type::handle_of(item))));
    out.push_back(item.cast<const WriteSource&>().source());
    if (keep != nullptr) keep->push_back(py::reinterpret_borrow<py::object>(item));
  }
  return out;
}

// The read bindings once took plain tuples; a caller still passing them (or anything else) gets
// a TypeError that names the class to build instead, rather than pybind11's cast error.
template <typename T>
const T& expect(const py::handle& item, const std::string& what, const std::string& replacement) {
  if (!py::isinstance<T>(item))
    throw py::type_error(what + " must be " + replacement.substr(0, replacement.find('(')) + " objects, got " +
                         std::string(py::str(py::type::handle_of(item).attr("__name__"))) + "; build each as " +
                         replacement);
  return item.cast<const T&>();
}

// One tensor to read: its destination pointer stays valid while anything references the TensorRead.
class PyTensorRead {
 public:
  PyTensorRead(std::string name, uint64_t offset, uint64_t nbytes, uint32_t crc32c, const py::buffer& into)
      : buffer_(into, true) {
    if (buffer_.size() != nbytes)
      throw pe::InvalidArgument("destination buffer of tensor '" + name + "' holds " +
                                std::to_string(buffer_.size()) + " bytes, not its " + std::to_string(nbytes));
    read_ = TensorRead{std::move(name), offset, nbytes, crc32c, buffer_.data()};
  }
  const TensorRead& read() const { return read_; }

 private:
  HeldBuffer buffer_;
  TensorRead read_;
};

using TensorReadList = py::typing::List<PyTensorRead>;
using TensorExtentList = py::typing::List<TensorExtent>;

// One shard to read. Its TensorReads are referenced here and cannot be replaced, so holding the
// ShardRead holds every destination buffer its core request points into.
class PyShardRead {
 public:
  PyShardRead(std::string path, uint64_t file_bytes, uint64_t header_bytes, uint32_t crc32c,
              const TensorReadList& tensors, const TensorExtentList& extents)
      : read_{std::move(path), file_bytes, header_bytes, crc32c, {}, {}} {
    for (const py::handle& item : tensors) {
      read_.tensors.push_back(
          expect<PyTensorRead>(item, "ShardRead tensors", "TensorRead(name, offset, nbytes, crc32c, into)").read());
      tensors_.push_back(py::reinterpret_borrow<py::object>(item));
    }
    for (const py::handle& item : extents)
      read_.extents.push_back(expect<TensorExtent>(item, "ShardRead extents", "TensorExtent(offset, nbytes, crc32c)"));
  }
  const ShardRead& read() const { return read_; }
  TensorReadList tensors() const {
    TensorReadList out;
    for (const py::object& t : tensors_) out.append(t);
    return out;
  }

 private:
  ShardRead read_;
  std::vector<py::object> tensors_;  // the PyTensorReads behind read_.tensors
};

using ShardReadList = py::typing::List<PyShardRead>;

// Checks for a pending signal (Ctrl-C) between the slices of a core wait; called on the waiting
// thread with no core lock held. Throws error_already_set, which ends the wait.
void check_signals() {
  py::gil_scoped_acquire gil;
  if (PyErr_CheckSignals() != 0) throw py::error_already_set();
}

const Poll kCheckSignals = check_signals;

// The Python-facing writer: the core plus the WriteSources of saves still being snapshotted.
// Every member is used with the GIL held.
class PyWriter {
 public:
  explicit PyWriter(WriterOptions options) : core_(std::make_unique<AsyncCheckpointWriter>(options)) {}
  ~PyWriter() {
    {
      // The join may take a whole persist; no pipeline thread needs the GIL, so let others run.
      py::gil_scoped_release release;
      core_.reset();
    }
    held_.clear();  // with the GIL, now that no thread reads the buffers
  }
  PyWriter(const PyWriter&) = delete;
  PyWriter& operator=(const PyWriter&) = delete;

  uint64_t save(uint64_t step, const SourceList& sources, std::string state_json, size_t sync_count,
                const std::string& directory) {
    release_staged();
    std::vector<py::object> keep;
    std::vector<TensorSource> srcs = sources_of(sources, &keep);
    uint64_t id;
    {
      py::gil_scoped_release release;
      id = core_->save(step, std::move(srcs), std::move(state_json), sync_count, directory, kCheckSignals);
    }
    if (!core_->snapshot_done(id)) held_.emplace(id, std::move(keep));
    return id;
  }

  uint64_t reserve(const SourceList& sources) {
    release_staged();
    std::vector<TensorSpec> specs;
    for (TensorSource& source : sources_of(sources, nullptr)) specs.push_back(std::move(source.spec));
    py::gil_scoped_release release;
    return core_->reserve(specs, kCheckSignals);
  }

  void wait_snapshot(uint64_t id) {
    {
      py::gil_scoped_release release;
      core_->wait_snapshot(id, kCheckSignals);
    }
    release_staged();
  }

  void wait(uint64_t id) {
    {
      py::gil_scoped_release release;
      core_->wait(id, kCheckSignals);
    }
    release_staged();
  }

  void wait_all() {
    {
      py::gil_scoped_release release;
      core_->wait_all(kCheckSignals);
    }
    release_staged();
  }

  SaveStats stats(uint64_t id) {
    release_staged();
    return core_->stats(id);
  }

  uint64_t staging_bytes() {
    release_staged();
    return core_->staging_bytes();
  }

 private:
  // Drops the sources of every save whose snapshot is done: the core reads them no more.
  void release_staged() {
    for (auto it = held_.begin(); it != held_.end();) {
      if (core_->snapshot_done(it->first))
        it = held_.erase(it);
      else
        ++it;
    }
  }

  std::unique_ptr<AsyncCheckpointWriter> core_;
  std::map<uint64_t, std::vector<py::object>> held_;  // save id -> its WriteSources
};

py::dict stats_dict(const SaveStats& s) {
  py::dict d;
  d["step"] = s.step;
  d["bytes"] = s.bytes;
  d["snapshot_seconds"] = s.snapshot_seconds;
  d["persist_seconds"] = s.persist_seconds;
  d["snapshot_done"] = s.snapshot_done;
  d["done"] = s.done;
  d["failed"] = s.failed;
  d["path"] = s.path;
  return d;
}

}  // namespace

void bind_checkpoint(py::module_& m) {
  m.def(
      "crc32c",
      [](const py::buffer& data, uint32_t crc) {
        Bytes b = bytes_of(data, false);
        py::gil_scoped_release release;
        return crc32c_extend(crc, b.data, b.size);
      },
      py::arg("data"), py::arg("crc") = 0, "CRC32C of a contiguous buffer, extending `crc`. Releases the GIL.");
  m.def(
      "crc32c_portable",
      [](const py::buffer& data) {
        Bytes b = bytes_of(data, false);
        return crc32c_extend_portable(0, b.data, b.size);
      },
      "CRC32C by the table implementation (for tests of the hardware path).");
  m.def("crc32c_combine", &crc32c_combine, py::arg("crc_a"), py::arg("crc_b"), py::arg("len_b"));
  m.def("crc32c_hardware_available", &crc32c_hardware_available);

  py::class_<WriteSource>(m, "WriteSource",
                          "One tensor to save: its name, safetensors dtype, shape and a 1-D contiguous buffer of "
                          "its bytes. Holds the buffer (and its exporter) for its whole life.")
      .def(py::init<std::string, std::string, std::vector<int64_t>, const py::buffer&>(), py::arg("name"),
           py::arg("dtype"), py::arg("shape"), py::arg("data"),
           "Requests `data`'s buffer now; raises ValueError unless it is one-dimensional and contiguous.")
      .def_property_readonly("name", [](const WriteSource& s) { return s.source().spec.name; })
      .def_property_readonly("dtype", [](const WriteSource& s) { return s.source().spec.dtype; })
      .def_property_readonly("shape", [](const WriteSource& s) { return s.source().spec.shape; })
      .def_property_readonly("nbytes", [](const WriteSource& s) { return s.source().spec.nbytes; });

  py::class_<PyWriter>(m, "AsyncCheckpointWriter",
                       "Snapshot-then-persist writer of checkpoint parts (see csrc/core/checkpoint/async_writer.h). "
                       "Destruction waits for every save in flight (GIL released).")
      .def(py::init([](size_t max_shards, size_t copy_threads, size_t max_in_flight, uint64_t staging_cap_bytes,
                       int background_nice) {
             if (background_nice < 0 || background_nice > 19)
               throw pe::InvalidArgument("background_nice must be in 0..19, got " + std::to_string(background_nice));
             return std::make_unique<PyWriter>(
                 WriterOptions{max_shards, copy_threads, max_in_flight, staging_cap_bytes, background_nice});
           }),
           py::kw_only(), py::arg("max_shards") = 4, py::arg("copy_threads") = 2, py::arg("max_in_flight") = 1,
           py::arg("staging_cap_bytes") = 0, py::arg("background_nice") = 0,
           "Raises ValueError for max_shards or max_in_flight of 0, or background_nice outside 0..19.")
      .def("save", &PyWriter::save, py::arg("step"), py::arg("sources"), py::arg("state_json"), py::arg("sync_count"),
           py::arg("directory"),
           "Blocks (GIL released, interruptible) for an in-flight slot, for staging memory and for copying "
           "sources[:sync_count]; the rest is copied in the background. The writer holds the sources until the "
           "snapshot is done. Writes the shards and manifest.json into `directory` (which must exist and be "
           "empty) and fsyncs them and it; commits nothing. Returns the save id.")
      .def("reserve", &PyWriter::reserve, py::arg("sources"),
           "Allocates and touches the staging memory a save of `sources` needs (nothing is copied); blocks "
           "(GIL released, interruptible) while it does, and while a staging cap is reached. Returns the "
           "staging bytes held.")
      .def("wait_snapshot", &PyWriter::wait_snapshot, py::arg("id"),
           "Blocks (GIL released, interruptible) until every byte of save `id` is staged.")
      .def("wait", &PyWriter::wait, py::arg("id"),
           "Blocks (GIL released, interruptible) until save `id`'s part is durable; raises its error (once) "
           "if it failed.")
      .def("wait_all", &PyWriter::wait_all,
           "Blocks (GIL released, interruptible) until no save is in flight; raises the first error not yet "
           "raised.")
      .def(
          "stats", [](PyWriter& w, uint64_t id) { return stats_dict(w.stats(id)); }, py::arg("id"),
          "Progress of save `id`: step, bytes, snapshot_seconds, persist_seconds, snapshot_done, done, failed, "
          "path. Does not block.")
      .def_property_readonly("staging_bytes", &PyWriter::staging_bytes);

  py::class_<TensorExtent>(m, "TensorExtent",
                           "Where one tensor lies in its shard (absolute offset, size) and its CRC32C, as the "
                           "manifest records them.")
      .def(py::init([](uint64_t offset, uint64_t nbytes, uint32_t crc32c) {
             return TensorExtent{offset, nbytes, crc32c};
           }),
           py::arg("offset"), py::arg("nbytes"), py::arg("crc32c"))
      .def_readonly("offset", &TensorExtent::offset)
      .def_readonly("nbytes", &TensorExtent::nbytes)
      .def_readonly("crc32c", &TensorExtent::crc32c);

  py::class_<PyTensorRead>(m, "TensorRead",
                           "One tensor to read: its name, absolute offset and size in the shard, its CRC32C and the "
                           "writable 1-D contiguous buffer it is read into. Holds the buffer (and its exporter) for "
                           "its whole life.")
      .def(py::init<std::string, uint64_t, uint64_t, uint32_t, const py::buffer&>(), py::arg("name"),
           py::arg("offset"), py::arg("nbytes"), py::arg("crc32c"), py::arg("into"),
           "Requests `into`'s buffer for writing now; raises ValueError unless it is one-dimensional, contiguous "
           "and exactly `nbytes` long.")
      .def_property_readonly("name", [](const PyTensorRead& t) { return t.read().name; })
      .def_property_readonly("offset", [](const PyTensorRead& t) { return t.read().offset; })
      .def_property_readonly("nbytes", [](const PyTensorRead& t) { return t.read().nbytes; })
      .def_property_readonly("crc32c", [](const PyTensorRead& t) { return t.read().crc32c; });

  py::class_<PyShardRead>(m, "ShardRead",
                          "The tensors to read from one shard file, with the manifest's size, header size and "
                          "CRC32C of the file. Holds its TensorReads (and so their buffers) for its whole life.")
      .def(py::init<std::string, uint64_t, uint64_t, uint32_t, const TensorReadList&, const TensorExtentList&>(),
           py::arg("path"), py::arg("file_bytes"), py::arg("header_bytes"), py::arg("crc32c"), py::arg("tensors"),
           py::arg("extents") = py::list(),
           "`extents`, every tensor of the shard, lets a read of only some of them still check the header. "
           "Raises TypeError for items that are not TensorRead / TensorExtent objects.")
      .def_property_readonly("path", [](const PyShardRead& s) { return s.read().path; })
      .def_property_readonly("file_bytes", [](const PyShardRead& s) { return s.read().file_bytes; })
      .def_property_readonly("header_bytes", [](const PyShardRead& s) { return s.read().header_bytes; })
      .def_property_readonly("crc32c", [](const PyShardRead& s) { return s.read().file_crc32c; })
      .def_property_readonly("tensors", &PyShardRead::tensors)
      .def_property_readonly("extents", [](const PyShardRead& s) { return s.read().extents; });

  m.def(
      "read_shards",
      [](const ShardReadList& shards, size_t threads) {
        // New references to every ShardRead (and so, through it, to every destination buffer), taken
        // before the GIL is released: the caller's list may change meanwhile.
        std::vector<py::object> keep;
        std::vector<ShardRead> reads;
        reads.reserve(shards.size());
        for (const py::handle& item : shards) {
          reads.push_back(
              expect<PyShardRead>(item, "read_shards() shards",
                                  "ShardRead(path, file_bytes, header_bytes, crc32c, tensors, extents)")
                  .read());
          keep.push_back(py::reinterpret_borrow<py::object>(item));
        }
        py::gil_scoped_release release;
        read_shards(reads, threads);
      },
      py::arg("shards"), py::arg("threads") = 4,
      "Reads and verifies tensors into their TensorRead buffers, up to `threads` shards in parallel. A shard "
      "with extents checks its header even when only some tensors are read. Blocks (GIL released). Raises "
      "TypeError for items that are not ShardRead objects.");
  m.def("verify_file", &verify_file, py::call_guard<py::gil_scoped_release>(), py::arg("path"), py::arg("file_bytes"),
        py::arg("file_crc32c"), "Checks a shard's size and whole-file CRC32C. Releases the GIL.");
}

}  // namespace pe::bindings
