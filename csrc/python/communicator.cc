// Communicator bindings. Buffers cross as addresses: the Python layer validates arrays of every
// kind (numpy, later cupy and torch) and keeps them alive; this layer only releases the GIL.
#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>

#include "pycomm/pycomm.h"
#include "python/bindings.h"

namespace py = pybind11;

namespace pycomm::python {

namespace {

void* Ptr(uintptr_t address) { return reinterpret_cast<void*>(address); }

// numpy arrays cross as themselves: reading their data pointer here costs far less than
// `a.ctypes.data` in Python. The Python layer has already checked them (contiguous, writeable
// outputs, dtype and size).
void* Data(const py::array& a) { return const_cast<void*>(a.data()); }

DataType ToDataType(int dtype) {
  if (dtype < 0 || dtype >= kNumDataTypes) throw py::value_error("pycomm: unknown dtype code " + std::to_string(dtype));
  return static_cast<DataType>(dtype);
}

ReduceOp ToReduceOp(int op) {
  if (op < 0 || op >= kNumReduceOps) throw py::value_error("pycomm: unknown op code " + std::to_string(op));
  return static_cast<ReduceOp>(op);
}

// The fast path's checks, for plain numpy arrays: -1 unless `a` is a C-contiguous, native-order
// array of a dtype the core reduces (ml_dtypes' bfloat16 and every odd case take the full
// Python checks instead, which also word the errors).
int FastDataType(const py::array& a) {
  if (!(a.flags() & py::array::c_style)) return -1;
  const py::dtype dtype = a.dtype();
  const char order = dtype.byteorder();
  if (order != '=' && order != '|' && order != (PY_BIG_ENDIAN ? '>' : '<')) return -1;
  const ssize_t size = dtype.itemsize();
  switch (dtype.kind()) {
    case 'f':
      return size == 2 ? 0 : size == 4 ? 2 : size == 8 ? 3 : -1;
    case 'i':
      return size == 1 ? 4 : size == 4 ? 6 : size == 8 ? 7 : -1;
    case 'u':
      return size == 1 ? 5 : size == 4 ? 8 : size == 8 ? 9 : -1;
    default:
      return -1;
  }
}

// The fast paths' checks of an input and an output: both of one fast dtype (FastDataType), `out`
// writeable, and the two either disjoint or in place: out starting `in_place_shift` bytes after x
// (0: the same memory; the caller checks the shapes). The dtype's code, or -1.
int FastPair(const py::array& x, const py::array& out, ptrdiff_t in_place_shift = 0) {
  const int dtype = FastDataType(x);
  if (dtype < 0 || FastDataType(out) != dtype || !out.writeable()) return -1;
  const auto xb = reinterpret_cast<uintptr_t>(x.data()), ob = reinterpret_cast<uintptr_t>(out.data());
  const auto xn = static_cast<uintptr_t>(x.nbytes()), on = static_cast<uintptr_t>(out.nbytes());
  if (ob - xb == static_cast<uintptr_t>(in_place_shift)) return dtype;
  return xb < ob + on && ob < xb + xn ? -1 : dtype;  // any other overlap
}

bool FastOp(int op, int dtype) {
  if (op < 0 || op >= kNumReduceOps) return false;
  return op != static_cast<int>(ReduceOp::kAvg) || dtype < 4;  // avg of integers: the full path says why
}

// Whether out's shape is x's with the first extent times `factor` (x's first extent divided by
// `divisor` for a reduce_scatter); a 0-d x stands for shape (1,).
bool ScaledShape(const py::array& x, const py::array& out, ssize_t factor, ssize_t divisor) {
  const ssize_t rows = x.ndim() ? x.shape(0) : 1;
  const ssize_t dims = std::max<ssize_t>(x.ndim(), 1);
  if (out.ndim() != dims || rows % divisor || out.shape(0) != rows / divisor * factor) return false;
  return x.ndim() == 0 || std::equal(x.shape() + 1, x.shape() + x.ndim(), out.shape() + 1);
}

// Each *IfPlain runs its collective on numpy arrays that pass the fast path's checks and returns
// true; otherwise it returns false having done nothing, and the full Python checks run (and
// word the error). A small call then costs about as much Python as an MPI call through mpi4py.
// The allreduce fast paths' checks: FastPair, FastOp and the same shape. The dtype's code, or -1.
int PlainAllreduce(const py::array& x, const py::array& out, int op) {
  const int dtype = FastPair(x, out);
  if (dtype < 0 || !FastOp(op, dtype)) return -1;
  if (x.ndim() != out.ndim() || !std::equal(x.shape(), x.shape() + x.ndim(), out.shape())) return -1;
  return dtype;
}

bool AllreduceIfPlain(Communicator& c, const py::array& x, const py::array& out, int op) {
  const int dtype = PlainAllreduce(x, out, op);
  if (dtype < 0) return false;
  py::gil_scoped_release release;
  c.Allreduce(x.data(), Data(out), x.size(), static_cast<DataType>(dtype), static_cast<ReduceOp>(op));
  return true;
}

// As AllreduceIfPlain, for allreduce_async: its Work, or None having issued nothing.
py::object AllreduceAsyncIfPlain(Communicator& c, const py::array& x, const py::array& out, int op) {
  const int dtype = PlainAllreduce(x, out, op);
  if (dtype < 0) return py::none();
  std::shared_ptr<Work> work;
  {
    py::gil_scoped_release release;  // as the full path: a stall here (PYCOMM_FAULT) holds no other thread
    work = c.AllreduceAsync(x.data(), Data(out), x.size(), static_cast<DataType>(dtype), static_cast<ReduceOp>(op));
  }
  return py::cast(work);
}

bool ReduceScatterIfPlain(Communicator& c, const py::array& x, const py::array& out, int op) {
  // In place (NCCL's form): out is this rank's block of x.
  const int dtype = FastPair(x, out, c.rank() * out.nbytes());
  if (dtype < 0 || !FastOp(op, dtype) || x.ndim() == 0 || !ScaledShape(x, out, 1, c.size())) return false;
  py::gil_scoped_release release;
  c.ReduceScatter(x.data(), Data(out), out.size(), static_cast<DataType>(dtype), static_cast<ReduceOp>(op));
  return true;
}

bool AllgatherIfPlain(Communicator& c, const py::array& x, const py::array& out) {
  // In place: x is this rank's block of out.
  const int dtype = FastPair(x, out, -c.rank() * x.nbytes());
  if (dtype < 0 || !ScaledShape(x, out, c.size(), 1)) return false;
  py::gil_scoped_release release;
  c.Allgather(x.data(), Data(out), x.size(), static_cast<DataType>(dtype));
  return true;
}

bool BroadcastIfPlain(Communicator& c, const py::array& buf, int root) {
  const int dtype = FastDataType(buf);
  if (dtype < 0 || !buf.writeable() || root < 0 || root >= c.size()) return false;
  py::gil_scoped_release release;
  c.Broadcast(Data(buf), buf.size(), static_cast<DataType>(dtype), root);
  return true;
}

// `with DeviceScope(gpu):` runs its body with that GPU current (UseDevice).
struct DeviceScope {
  int device;
  std::shared_ptr<void> used;
};

}  // namespace

void RegisterCommunicator(py::module_& m) {
  m.def("mpi_build_version", &MpiBuildVersion);
  m.def("built_with_cuda", &BuiltWithCuda);
  // For benchmarks' latency breakdowns: [(phase, seconds, laps)] of the device calls since
  // set_phase_timing(True).
  m.def("set_phase_timing", &SetPhaseTiming, py::arg("on"));
  m.def("phase_times", [] {
    py::list out;
    for (const PhaseTime& t : PhaseTimes()) out.append(py::make_tuple(t.phase, t.seconds, t.laps));
    return out;
  });
  m.def("any_peer_failed", &Communicator::AnyPeerFailed);
  py::class_<DeviceScope>(m, "DeviceScope")
      .def(py::init([](int device) { return DeviceScope{device, nullptr}; }))
      .def("__enter__", [](DeviceScope& s) { s.used = UseDevice(s.device); })
      .def("__exit__", [](DeviceScope& s, const py::args&) { s.used.reset(); });

  py::class_<Work, std::shared_ptr<Work>>(m, "Work")
      .def("wait", &Work::Wait, py::call_guard<py::gil_scoped_release>())
      .def("done", &Work::Done)
      .def("seconds", &Work::Seconds);

  py::class_<Communicator>(m, "Communicator")
      .def(py::init(
               [](uint64_t mpi_comm, size_t chunk_bytes, double timeout_s, bool debug, int algorithm, int inter_node) {
                 Options options;
                 options.chunk_bytes = chunk_bytes;
                 options.timeout_s = timeout_s;
                 options.debug = debug;
                 options.algorithm = static_cast<Algorithm>(algorithm);
                 options.inter_node = static_cast<InterNode>(inter_node);
                 py::gil_scoped_release release;
                 return Communicator::FromMpi(static_cast<intptr_t>(mpi_comm), options);
               }),
           py::arg("mpi_comm"), py::arg("chunk_bytes"), py::arg("timeout_s"), py::arg("debug"), py::arg("algorithm"),
           py::arg("inter_node"))
      .def_property_readonly("rank", &Communicator::rank)
      .def_property_readonly("size", &Communicator::size)
      .def_property_readonly("local_rank", &Communicator::local_rank)
      .def_property_readonly("local_size", &Communicator::local_size)
      .def_property_readonly("chunk_bytes", [](const Communicator& c) { return c.options().chunk_bytes; })
      .def_property_readonly("timeout", [](const Communicator& c) { return c.options().timeout_s; })
      .def_property_readonly("algorithm", [](const Communicator& c) { return static_cast<int>(c.options().algorithm); })
      .def_property_readonly("inter_node",
                             [](const Communicator& c) { return static_cast<int>(c.options().inter_node); })
      .def(
          "allreduce",
          [](Communicator& c, const py::array& send, const py::array& recv, size_t count, int dtype, int op) {
            c.Allreduce(Data(send), Data(recv), count, ToDataType(dtype), ToReduceOp(op));
          },
          py::call_guard<py::gil_scoped_release>())
      .def("allreduce_if_plain", &AllreduceIfPlain, py::arg("x"), py::arg("out"), py::arg("op"))
      .def("allreduce_async_if_plain", &AllreduceAsyncIfPlain, py::arg("x"), py::arg("out"), py::arg("op"))
      .def("reduce_scatter_if_plain", &ReduceScatterIfPlain, py::arg("x"), py::arg("out"), py::arg("op"))
      .def("allgather_if_plain", &AllgatherIfPlain, py::arg("x"), py::arg("out"))
      .def("broadcast_if_plain", &BroadcastIfPlain, py::arg("buf"), py::arg("root"))
      .def(
          "allreduce_async",
          [](Communicator& c, const py::array& send, const py::array& recv, size_t count, int dtype, int op) {
            return c.AllreduceAsync(Data(send), Data(recv), count, ToDataType(dtype), ToReduceOp(op));
          },
          py::call_guard<py::gil_scoped_release>())
      .def(
          "reduce_scatter",
          [](Communicator& c, const py::array& send, const py::array& recv, size_t recv_count, int dtype, int op) {
            c.ReduceScatter(Data(send), Data(recv), recv_count, ToDataType(dtype), ToReduceOp(op));
          },
          py::call_guard<py::gil_scoped_release>())
      .def(
          "allgather",
          [](Communicator& c, const py::array& send, const py::array& recv, size_t send_count, int dtype) {
            c.Allgather(Data(send), Data(recv), send_count, ToDataType(dtype));
          },
          py::call_guard<py::gil_scoped_release>())
      .def(
          "broadcast",
          [](Communicator& c, const py::array& buf, size_t count, int dtype, int root) {
            c.Broadcast(Data(buf), count, ToDataType(dtype), root);
          },
          py::call_guard<py::gil_scoped_release>())
      .def(
          "allreduce_device",
          [](Communicator& c, uintptr_t send, uintptr_t recv, size_t count, int dtype, int op, int device,
             uintptr_t stream) {
            c.AllreduceDevice(Ptr(send), Ptr(recv), count, ToDataType(dtype), ToReduceOp(op), device, Ptr(stream));
          },
          py::call_guard<py::gil_scoped_release>())
      .def(
          "reduce_scatter_device",
          [](Communicator& c, uintptr_t send, uintptr_t recv, size_t recv_count, int dtype, int op, int device,
             uintptr_t stream) {
            c.ReduceScatterDevice(Ptr(send), Ptr(recv), recv_count, ToDataType(dtype), ToReduceOp(op), device,
                                  Ptr(stream));
          },
          py::call_guard<py::gil_scoped_release>())
      .def(
          "allgather_device",
          [](Communicator& c, uintptr_t send, uintptr_t recv, size_t send_count, int dtype, int device,
             uintptr_t stream) {
            c.AllgatherDevice(Ptr(send), Ptr(recv), send_count, ToDataType(dtype), device, Ptr(stream));
          },
          py::call_guard<py::gil_scoped_release>())
      .def(
          "broadcast_device",
          [](Communicator& c, uintptr_t buf, size_t count, int dtype, int root, int device, uintptr_t stream) {
            c.BroadcastDevice(Ptr(buf), count, ToDataType(dtype), root, device, Ptr(stream));
          },
          py::call_guard<py::gil_scoped_release>())
      .def(
          "allocate_shared",
          [](Communicator& c, size_t bytes) -> py::object {
            void* data = nullptr;
            std::shared_ptr<void> mapping;
            {
              py::gil_scoped_release release;
              mapping = c.AllocateShared(bytes, &data);
            }
            if (!mapping) return py::none();
            // The array owns a reference to the mapping: the memory lives as long as any view.
            auto* owner = new std::shared_ptr<void>(std::move(mapping));
            py::capsule keep(owner, [](void* p) { delete static_cast<std::shared_ptr<void>*>(p); });
            return py::array_t<uint8_t>({bytes}, {size_t{1}}, static_cast<uint8_t*>(data), keep);
          },
          py::arg("bytes"))
      // The GPU a device pointer is on, for arrays that do not say (std::invalid_argument, so
      // ValueError, where it is not GPU memory).
      .def_static("device_of", [](uintptr_t ptr) { return DeviceOfPointer(Ptr(ptr)); })
      .def_static("order_after_stream",
                  [](uintptr_t ptr, uintptr_t stream, uintptr_t producer) {
                    OrderAfterStream(Ptr(ptr), Ptr(stream), Ptr(producer));
                  })
      .def("barrier", &Communicator::Barrier, py::call_guard<py::gil_scoped_release>())
      .def("close", &Communicator::Close, py::call_guard<py::gil_scoped_release>());
}

}  // namespace pycomm::python
