// Allreduce from a C++ MPI program with pycomm: sum and average of float vectors of several sizes
// over MPI_COMM_WORLD, checked against the expected values. Prints one line per rank and exits
// non-zero on any error.
//
//   mpirun -n 4 ./allreduce_example
#include <mpi.h>
#include <pycomm/pycomm.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <memory>
#include <vector>

namespace {

// Rank r contributes r + 1 + i % 7 at index i: small integers, so the sum is exact in float.
float Input(int rank, size_t i) { return static_cast<float>(rank + 1 + static_cast<int>(i % 7)); }

float ExpectedSum(int size, size_t i) {
  return static_cast<float>(size * (size + 1) / 2 + size * static_cast<int>(i % 7));
}

// Returns how many elements differ from the expected sum (op kSum) or average (op kAvg).
size_t Check(const std::vector<float>& got, int size, pycomm::ReduceOp op) {
  size_t wrong = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const float sum = ExpectedSum(size, i);
    if (op == pycomm::ReduceOp::kSum) {
      wrong += got[i] != sum;
    } else {
      const float avg = sum / static_cast<float>(size);
      wrong += std::fabs(got[i] - avg) > 1e-6f * std::fabs(avg);
    }
  }
  return wrong;
}

int Run(pycomm::Communicator& comm) {
  const int rank = comm.rank(), size = comm.size();
  // Up to 16 MiB of floats: one element, a few chunks' worth, and past 1 MiB (several chunks).
  const size_t counts[] = {1, 1000, (size_t{1} << 18) + 3, size_t{1} << 22};
  size_t wrong = 0, checked = 0;
  for (size_t count : counts) {
    std::vector<float> x(count), y(count);
    for (size_t i = 0; i < count; ++i) x[i] = Input(rank, i);

    // Out of place: y = sum over ranks of x.
    comm.Allreduce(x.data(), y.data(), count, pycomm::DataType::kFloat32, pycomm::ReduceOp::kSum);
    wrong += Check(y, size, pycomm::ReduceOp::kSum);
    // In place and asynchronous: x becomes the average over ranks.
    comm.AllreduceAsync(x.data(), x.data(), count, pycomm::DataType::kFloat32, pycomm::ReduceOp::kAvg)->Wait();
    wrong += Check(x, size, pycomm::ReduceOp::kAvg);
    checked += 2 * count;
  }
  std::printf("rank %d of %d: allreduce sum and avg of float32 x {1, 1000, 262147, 4194304}: %zu of %zu wrong\n", rank,
              size, wrong, checked);
  return wrong == 0 ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  // The engine runs collectives on a progress thread of its own, next to the caller's MPI calls.
  int provided = 0;
  MPI_Init_thread(&argc, &argv, MPI_THREAD_MULTIPLE, &provided);
  if (provided < MPI_THREAD_MULTIPLE) {
    std::fprintf(stderr, "this MPI does not provide MPI_THREAD_MULTIPLE\n");
    MPI_Abort(MPI_COMM_WORLD, 2);
  }
  int status = 0;
  try {
    // MPICH's MPI_Comm is an int and Open MPI's a pointer: a C-style cast converts either.
    std::unique_ptr<pycomm::Communicator> comm = pycomm::Communicator::FromMpi((intptr_t)MPI_COMM_WORLD);
    status = Run(*comm);
    comm->Close();  // before MPI_Finalize: it stops the progress thread and frees the MPI duplicate
  } catch (const std::exception& error) {
    int rank = -1;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    std::fprintf(stderr, "rank %d: %s\n", rank, error.what());
    status = 1;
  }
  MPI_Finalize();
  return status;
}
