// Bindings for the data engine. Batches cross as DataBatch objects that expose their pooled
// buffer through the buffer protocol; the Python layer views it with numpy and torch
// (no copy), and the buffer returns to the pool when the last view is freed. Single samples
// are copied out of the maps by the core (checked, and guarded against a file shrinking under
// the map); no numpy view of a map is ever handed out. Calls that wait or read release the
// GIL; worker threads never touch Python.
#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include <chrono>
#include <memory>

#include "bindings.h"
#include "common/errors.h"
#include "data/batch_assembler.h"
#include "data/block_checksum_writer.h"
#include "data/mmap_dataset.h"
#include "data/prefetcher.h"

namespace py = pybind11;

namespace pe::bindings {
namespace {

using data::Batch;
using data::BatchAssembler;
using data::MmapDataset;
using data::Prefetcher;

struct PyDataset {
  std::shared_ptr<const MmapDataset> ds;
};

// A delivered batch. Holds its pooled buffer; when the buffer is caller-owned pinned
// memory, also a reference to its Python owner so it outlives every view of it.
struct PyBatch {
  Batch batch;
  py::object keepalive;
};

// How one field of a batch is viewed: numpy dtype and per-sample shape (fixed fields),
// or dtype only (variable fields: flat data plus int64 offsets).
struct FieldView {
  py::dtype dtype;
  std::vector<py::ssize_t> sample_shape;
  bool variable;
};

struct PyLoader {
  std::shared_ptr<const BatchAssembler> assembler;
  std::unique_ptr<Prefetcher> prefetcher;
  py::list pinned_owners;
  std::vector<FieldView> views;
};

std::unique_ptr<PyDataset> open_dataset(const py::list& fields, const std::vector<uint64_t>& shard_counts,
                                        uint32_t verify, uint32_t version) {
  std::vector<data::FieldSpec> specs;
  for (const py::handle& item : fields) {
    auto t = item.cast<py::tuple>();  // (name, kind, sample_bytes, dtype, [paths][, sample shape])
    specs.push_back(data::FieldSpec{t[0].cast<std::string>(), static_cast<data::FieldKind>(t[1].cast<uint32_t>()),
                                    t[2].cast<uint64_t>(), t[3].cast<std::string>(),
                                    t[4].cast<std::vector<std::string>>(), std::nullopt});
    if (t.size() > 5) specs.back().shape = t[5].cast<std::vector<uint64_t>>();
  }
  if (verify > static_cast<uint32_t>(data::Verify::kOpen)) throw py::value_error("verify must be 0, 1 or 2");
  py::gil_scoped_release release;
  return std::make_unique<PyDataset>(PyDataset{
      std::make_shared<const MmapDataset>(specs, shard_counts, static_cast<data::Verify>(verify), version)});
}

const data::ShardFile& shard_of(const PyDataset& d, size_t field, size_t shard) {
  if (field >= d.ds->num_fields() || shard >= d.ds->num_shards()) throw py::index_error("field or shard out of range");
  return d.ds->shard(field, shard);
}

// Sample i as one fresh uint8 array per field: sizes first (GIL held: allocating needs it),
// then the checked, guarded copy with the GIL released.
py::list read_sample(const PyDataset& d, uint64_t i) {
  const MmapDataset& ds = *d.ds;
  if (i >= ds.size()) throw py::index_error("sample index out of range");
  std::vector<uint64_t> sizes(ds.num_fields());
  ds.sample_sizes(i, sizes.data());
  py::list arrays;
  std::vector<uint8_t*> dst(ds.num_fields());
  for (size_t f = 0; f < sizes.size(); ++f) {
    py::array_t<uint8_t> a(static_cast<py::ssize_t>(sizes[f]));
    dst[f] = a.mutable_data();
    arrays.append(std::move(a));
  }
  {
    py::gil_scoped_release release;
    ds.read_sample(i, dst.data());
  }
  return arrays;
}

// (epoch, index, pinned, [arrays]): numpy views of the batch buffer, one per fixed field and
// two (data, offsets) per variable field, each keeping the buffer's lease alive. Built here
// rather than in Python because this runs once per batch right after the training step,
// when the interpreter's caches are cold: every Python-level operation saved counts.
py::object batch_views(PyLoader& l, Batch&& batch) {
  py::object keepalive = batch.buffer.external() ? py::object(l.pinned_owners) : py::object(py::none());
  const uint64_t epoch = batch.epoch, index = batch.index, n = batch.size;
  const bool pinned = batch.buffer.external();
  py::object owner = py::cast(std::make_unique<PyBatch>(PyBatch{std::move(batch), std::move(keepalive)}));
  const Batch& b = owner.cast<PyBatch&>().batch;
  if (l.views.size() != b.fields.size()) throw pe::InvalidArgument("set_views() was not called with every field");
  py::list arrays;
  for (size_t f = 0; f < b.fields.size(); ++f) {
    const FieldView& v = l.views[f];
    const data::FieldLayout& lay = b.fields[f];
    uint8_t* base = b.buffer.data();
    if (!v.variable) {
      std::vector<py::ssize_t> shape{static_cast<py::ssize_t>(n)};
      shape.insert(shape.end(), v.sample_shape.begin(), v.sample_shape.end());
      arrays.append(py::array(v.dtype, shape, base + lay.data_offset, owner));
    } else {
      auto count = static_cast<py::ssize_t>(lay.data_bytes / static_cast<uint64_t>(v.dtype.itemsize()));
      arrays.append(py::array(v.dtype, {count}, base + lay.data_offset, owner));
      arrays.append(py::array(py::dtype("int64"), {static_cast<py::ssize_t>(n + 1)}, base + lay.offsets_offset, owner));
    }
  }
  return py::make_tuple(epoch, index, pinned, arrays);
}

py::object next_batch(PyLoader& l) {
  Batch batch;
  // Fast path: a prefetched batch is usually waiting; take it without releasing the GIL.
  Prefetcher::Status status = l.prefetcher->next(&batch, std::chrono::milliseconds(0));
  // Otherwise wait in short slices so Ctrl-C (a pending signal) interrupts a blocked consumer.
  while (status == Prefetcher::Status::kTimeout) {
    if (PyErr_CheckSignals() != 0) throw py::error_already_set();
    py::gil_scoped_release release;
    status = l.prefetcher->next(&batch, std::chrono::milliseconds(100));
  }
  if (status == Prefetcher::Status::kEnd) return py::none();
  return batch_views(l, std::move(batch));
}

}  // namespace

void bind_data(py::module_& m) {
  py::class_<PyDataset>(m, "MmapDataset", "Memory-mapped, validated dataset files (see csrc/core/data/).")
      .def(py::init(&open_dataset), py::arg("fields"), py::arg("shard_counts"), py::arg("verify") = 1,
           py::arg("version") = data::kFormatVersion,
           "fields: [(name, kind 0 fixed / 1 variable, sample_bytes, dtype, [shard paths][, sample shape])]; "
           "a given shape ([] for variable fields) must match every file's header. verify: 0 never, 1 each "
           "block on its first read, 2 everything now. version: dataset.json's, which every header must record. "
           "Opens and checks every file. Releases the GIL.")
      .def_property_readonly("num_samples", [](const PyDataset& d) { return d.ds->size(); })
      .def_property_readonly("num_shards", [](const PyDataset& d) { return d.ds->num_shards(); })
      .def_property_readonly("checks_blocks", [](const PyDataset& d) { return d.ds->checks_blocks(); },
                             "Whether reads are checked against block checksums (every file is version 2, "
                             "verify is not 0).")
      .def("payload_bytes",
           [](const PyDataset& d, size_t field, size_t shard) { return shard_of(d, field, shard).payload_bytes(); },
           py::arg("field"), py::arg("shard"), "Payload bytes of one field-shard file.")
      .def("read_sample", &read_sample, py::arg("index"),
           "Sample `index` as one fresh uint8 array per field, its blocks checked first. Raises DataError "
           "(a bad block, a file that shrank). Releases the GIL while copying.");

  py::class_<data::BlockChecksumWriter>(m, "BlockChecksumWriter",
                                        "CRC32Cs of each block_bytes of a payload written in chunks (the writer's "
                                        "block table) and of the whole payload.")
      .def(py::init<uint64_t>(), py::arg("block_bytes"))
      .def("update",
           [](data::BlockChecksumWriter& w, const py::buffer& data) {
             py::buffer_info info = data.request();
             if (!PyBuffer_IsContiguous(info.view(), 'C')) throw py::value_error("update() needs a contiguous buffer");
             py::gil_scoped_release release;
             w.update(info.ptr, static_cast<size_t>(info.size * info.itemsize));
           },
           py::arg("data"), "Adds the next bytes of the payload. Releases the GIL.")
      .def("table",
           [](const data::BlockChecksumWriter& w) {
             std::vector<uint32_t> t = w.table();
             return py::bytes(reinterpret_cast<const char*>(t.data()), 4 * t.size());
           },
           "The block table so far, as little-endian uint32 bytes.")
      .def_property_readonly("payload_crc32c", &data::BlockChecksumWriter::payload_crc32c)
      .def_property_readonly("payload_bytes", &data::BlockChecksumWriter::payload_bytes);

  py::class_<PyBatch>(m, "DataBatch", py::buffer_protocol(), "One assembled batch in a pooled buffer.")
      .def_buffer([](PyBatch& b) {
        return py::buffer_info(b.batch.buffer.data(), 1, py::format_descriptor<uint8_t>::format(), 1,
                               {static_cast<py::ssize_t>(b.batch.bytes)}, {1}, false);
      })
      .def_property_readonly("epoch", [](const PyBatch& b) { return b.batch.epoch; })
      .def_property_readonly("index", [](const PyBatch& b) { return b.batch.index; })
      .def_property_readonly("size", [](const PyBatch& b) { return b.batch.size; })
      .def_property_readonly("nbytes", [](const PyBatch& b) { return b.batch.bytes; })
      .def_property_readonly("pinned", [](const PyBatch& b) { return b.batch.buffer.external(); })
      .def_property_readonly("fields", [](const PyBatch& b) {
        py::list out;
        for (const data::FieldLayout& f : b.batch.fields) out.append(py::make_tuple(f.data_offset, f.data_bytes, f.offsets_offset));
        return out;
      });

  py::class_<PyLoader>(m, "DataLoaderCore", "Sampler + worker threads + ordered bounded prefetch ring.")
      .def(py::init([](const PyDataset& d, uint64_t batch_size, bool drop_last, int order, uint64_t seed,
                       uint64_t rank, uint64_t world_size, uint64_t block_size, uint64_t window_blocks, size_t threads,
                       size_t depth, uint64_t cache_bytes) {
             data::SamplerConfig cfg{d.ds->size(), batch_size, drop_last, static_cast<data::Order>(order), seed,
                                     rank, world_size, block_size, window_blocks};
             data::Sampler sampler(cfg);
             auto assembler = std::make_shared<const BatchAssembler>(d.ds, cache_bytes, depth + threads + 2);
             auto l = std::make_unique<PyLoader>();
             l->assembler = assembler;
             l->prefetcher = std::make_unique<Prefetcher>(assembler, sampler, threads, depth);
             return l;
           }),
           py::arg("dataset"), py::arg("batch_size"), py::arg("drop_last"), py::arg("order"), py::arg("seed"),
           py::arg("rank"), py::arg("world_size"), py::arg("block_size"), py::arg("window_blocks"),
           py::arg("threads"), py::arg("depth"), py::arg("cache_bytes"))
      .def_property_readonly("num_batches", [](const PyLoader& l) { return l.prefetcher->sampler().num_batches(); })
      .def("batch_indices",
           [](const PyLoader& l, uint64_t epoch, uint64_t b) {
             const data::Sampler& s = l.prefetcher->sampler();
             if (b >= s.num_batches()) throw py::index_error("batch index out of range");
             py::array_t<uint64_t> out(static_cast<py::ssize_t>(s.batch_len(b)));
             s.batch_indices(epoch, b, out.mutable_data());
             return out;
           },
           py::arg("epoch"), py::arg("batch"), "The sample indices of one batch (the sampler, without reading).")
      .def("start", [](PyLoader& l, uint64_t epoch, uint64_t batch, bool infinite) {
             py::gil_scoped_release release;
             l.prefetcher->start(epoch, batch, infinite);
           },
           py::arg("epoch"), py::arg("batch"), py::arg("infinite"),
           "Starts worker threads at (epoch, batch), stopping any previous run (joins: releases the GIL).")
      .def("set_views",
           [](PyLoader& l, const py::list& fields) {
             l.views.clear();
             for (const py::handle& item : fields) {
               auto t = item.cast<py::tuple>();  // (numpy dtype, sample shape or None)
               bool variable = t[1].is_none();
               l.views.push_back(FieldView{py::dtype::from_args(t[0]),
                                           variable ? std::vector<py::ssize_t>{} : t[1].cast<std::vector<py::ssize_t>>(),
                                           variable});
             }
           },
           py::arg("fields"), "How next() views each field: [(dtype, sample shape, or None if variable)].")
      .def("next", &next_batch,
           "The next batch in order as (epoch, index, pinned, [numpy views]); None at the end of a finite run. "
           "Blocks (GIL released) while none is ready. Re-raises a worker's error with its message; raises "
           "KeyboardInterrupt if interrupted while waiting.")
      .def("stop", [](PyLoader& l) { l.prefetcher->stop(); }, py::call_guard<py::gil_scoped_release>(),
           "Closes the ring and joins the workers; idempotent. Releases the GIL.")
      .def("_inject_failure", [](PyLoader& l, int64_t index) { l.prefetcher->inject_failure(index); },
           py::arg("batch"), "Test hook: assembling this batch index throws DataError (-1: off).")
      .def("_inject_delay", [](PyLoader& l, uint32_t ms) { l.prefetcher->inject_delay(ms); }, py::arg("ms"),
           "Test hook: every batch takes `ms` longer to assemble (stop() cuts the wait short).")
      .def_property_readonly("running", [](const PyLoader& l) { return l.prefetcher->running(); })
      .def("fixed_batch_bytes", [](const PyLoader& l, uint64_t n) { return l.assembler->fixed_batch_bytes(n); })
      .def("add_pinned_buffer",
           [](PyLoader& l, const py::object& owner, uintptr_t ptr, uint64_t capacity) {
             l.pinned_owners.append(owner);
             l.assembler->pool()->add_external(reinterpret_cast<uint8_t*>(ptr), capacity);
           },
           py::arg("owner"), py::arg("ptr"), py::arg("capacity"),
           "Adds caller-owned (pinned) memory to the batch pool; `owner` is kept alive with every batch in it.")
      .def_property_readonly("pool_bytes", [](const PyLoader& l) { return l.assembler->pool()->allocated_bytes(); })
      .def("cache_stats", [](const PyLoader& l) {
        const data::BlockCache& c = l.assembler->cache();
        py::dict d;
        d["budget_bytes"] = c.budget_bytes();
        d["cached_bytes"] = c.cached_bytes();
        d["hit_bytes"] = c.hit_bytes();
        d["miss_bytes"] = c.miss_bytes();
        return d;
      });
}

}  // namespace pe::bindings
