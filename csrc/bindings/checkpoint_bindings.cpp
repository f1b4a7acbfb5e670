// Bindings for the checkpoint engine. Tensors cross as 1-D uint8 buffers (the Python layer
// passes `tensor.view(torch.uint8).numpy()`), so the core never sees torch. Every call that
// copies, writes, reads or waits releases the GIL.
#include <pybind11/stl.h>

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

Bytes bytes_of(const py::buffer& buffer, bool writable) {
  py::buffer_info info = buffer.request(writable);
  if (info.ndim > 1 || (info.ndim == 1 && info.strides[0] != info.itemsize))
    throw pe::InvalidArgument("buffer must be one-dimensional and contiguous");
  return Bytes{static_cast<uint8_t*>(info.ptr), static_cast<uint64_t>(info.size * info.itemsize)};
}

// Writer sources arrive as (name, dtype, shape, buffer) tuples; save() and reserve() share this.
std::vector<TensorSource> sources_of(const py::list& sources) {
  std::vector<TensorSource> out;
  out.reserve(sources.size());
  for (const py::handle& item : sources) {
    auto t = item.cast<py::tuple>();
    if (t.size() != 4) throw pe::InvalidArgument("each source is (name, dtype, shape, buffer)");
    Bytes b = bytes_of(t[3].cast<py::buffer>(), false);
    TensorSpec spec{t[0].cast<std::string>(), t[1].cast<std::string>(), t[2].cast<std::vector<int64_t>>(), b.size};
    out.push_back(TensorSource{std::move(spec), b.data});
  }
  return out;
}

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

  py::class_<AsyncCheckpointWriter>(m, "AsyncCheckpointWriter",
                                    "Snapshot-then-persist checkpoint pipeline (see csrc/core/checkpoint/async_writer.h).")
      .def(py::init([](std::string directory, size_t max_shards, size_t copy_threads, size_t max_in_flight,
                       uint64_t staging_cap_bytes, size_t keep_last, int background_nice) {
             if (background_nice < 0 || background_nice > 19)
               throw pe::InvalidArgument("background_nice must be in 0..19, got " + std::to_string(background_nice));
             return std::make_unique<AsyncCheckpointWriter>(WriterOptions{std::move(directory), max_shards,
                                                                          copy_threads, max_in_flight,
                                                                          staging_cap_bytes, keep_last, background_nice});
           }),
           py::arg("directory"), py::arg("max_shards") = 4, py::arg("copy_threads") = 2, py::arg("max_in_flight") = 1,
           py::arg("staging_cap_bytes") = 0, py::arg("keep_last") = 0, py::arg("background_nice") = 0)
      .def(
          "save",
          [](AsyncCheckpointWriter& w, uint64_t step, const py::list& sources, std::string state_json,
             size_t sync_count, std::string directory) {
            std::vector<TensorSource> srcs = sources_of(sources);
            py::gil_scoped_release release;
            return w.save(step, std::move(srcs), std::move(state_json), sync_count, directory);
          },
          py::arg("step"), py::arg("sources"), py::arg("state_json"), py::arg("sync_count"),
          py::arg("directory") = std::string(),
          "Blocks for an in-flight slot and for copying sources[:sync_count]; the rest is copied in the "
          "background. Keep every source alive until wait_snapshot(id) returns. Commits step-N under "
          "`directory` (default: the writer's; keep_last prunes only there). Returns the save id.")
      .def(
          "reserve",
          [](AsyncCheckpointWriter& w, const py::list& sources) {
            std::vector<TensorSpec> specs;
            for (TensorSource& source : sources_of(sources)) specs.push_back(std::move(source.spec));
            py::gil_scoped_release release;
            return w.reserve(specs);
          },
          py::arg("sources"),
          "Allocates and touches the staging memory a save of `sources` needs (nothing is copied); blocks "
          "while it does, and while a staging cap is reached. Returns the staging bytes held.")
      .def("wait_snapshot", &AsyncCheckpointWriter::wait_snapshot, py::call_guard<py::gil_scoped_release>(),
           "Blocks until every byte of save `id` is staged.")
      .def("wait", &AsyncCheckpointWriter::wait, py::call_guard<py::gil_scoped_release>(),
           "Blocks until save `id` is durable; raises its error if it failed.")
      .def("wait_all", &AsyncCheckpointWriter::wait_all, py::call_guard<py::gil_scoped_release>(),
           "Blocks until no save is in flight; raises the first error not yet raised.")
      .def("stats", [](AsyncCheckpointWriter& w, uint64_t id) { return stats_dict(w.stats(id)); })
      .def_property_readonly("staging_bytes", &AsyncCheckpointWriter::staging_bytes);

  m.def(
      "read_shards",
      [](const py::list& shards, size_t threads) {
        std::vector<ShardRead> reads;
        for (const py::handle& item : shards) {
          // (path, file_bytes, header_bytes, crc, [(name, off, n, crc, buf)][, [(off, n, crc) of every tensor]])
          auto s = item.cast<py::tuple>();
          if (s.size() != 5 && s.size() != 6)
            throw pe::InvalidArgument("each shard is (path, file_bytes, header_bytes, crc32c, reads[, extents])");
          ShardRead r{s[0].cast<std::string>(), s[1].cast<uint64_t>(), s[2].cast<uint64_t>(), s[3].cast<uint32_t>(), {}, {}};
          if (s.size() == 6)
            for (const py::handle& ei : s[5].cast<py::list>()) {
              auto e = ei.cast<py::tuple>();
              r.extents.push_back(TensorExtent{e[0].cast<uint64_t>(), e[1].cast<uint64_t>(), e[2].cast<uint32_t>()});
            }
          for (const py::handle& ti : s[4].cast<py::list>()) {
            auto t = ti.cast<py::tuple>();
            Bytes b = bytes_of(t[4].cast<py::buffer>(), true);
            uint64_t n = t[2].cast<uint64_t>();
            if (b.size != n) throw pe::InvalidArgument("destination buffer size does not match the tensor");
            r.tensors.push_back(TensorRead{t[0].cast<std::string>(), t[1].cast<uint64_t>(), n, t[3].cast<uint32_t>(), b.data});
          }
          reads.push_back(std::move(r));
        }
        py::gil_scoped_release release;
        read_shards(reads, threads);
      },
      py::arg("shards"), py::arg("threads") = 4,
      "Reads and verifies tensors into destination buffers, shards in parallel. With each shard's extents "
      "(every tensor's offset, size and CRC32C), a partial read checks the header too. Releases the GIL.");
  m.def("verify_file", &verify_file, py::call_guard<py::gil_scoped_release>(), py::arg("path"), py::arg("file_bytes"),
        py::arg("file_crc32c"), "Checks a shard's size and whole-file CRC32C. Releases the GIL.");
}

}  // namespace pe::bindings
