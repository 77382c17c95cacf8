/* MPI_Allreduce latency in the manner of the OSU Micro-Benchmarks' osu_allreduce, written for
 * pycomm: run it with and without libpycomm_mpi.so preloaded (bench/preload_bench.sh).
 *
 *   osu_allreduce [-m MIN:MAX] [-i ITERS] [-x WARMUP] [-c] [-f] [-t]
 *
 * For each size (bytes, doubling from MIN to MAX; 4 B .. 64 MiB by default) of MPI_FLOAT data,
 * MPI_SUM over MPI_COMM_WORLD: a barrier, WARMUP untimed calls, ITERS timed calls; each rank's
 * mean time per call, then the average, minimum and maximum of those over ranks. Large sizes run
 * fewer iterations (as OSU does) so that a sweep stays short. -c checks every result (small
 * integers in floats: exact whatever the summation order). -f adds the per-rank min/max columns.
 * -t initialises MPI at MPI_THREAD_MULTIPLE, as mpi4py does, instead of plain MPI_Init: MPICH's
 * own MPI_Allreduce is several times faster at that level on a loaded or oversubscribed machine
 * (bench/README.md), so the two baselines differ.
 */
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int g_rank, g_size;

static void Usage(void) {
  if (g_rank == 0) fprintf(stderr, "usage: osu_allreduce [-m MIN:MAX] [-i ITERS] [-x WARMUP] [-c] [-f] [-t]\n");
  MPI_Abort(MPI_COMM_WORLD, 2);
}

static size_t ParseSize(const char* text) {
  char* end = NULL;
  double value = strtod(text, &end);
  if (*end == 'K' || *end == 'k') value *= 1024.0, ++end;
  if (*end == 'M' || *end == 'm') value *= 1048576.0, ++end;
  if (*end != '\0' || value < 0) Usage();
  return (size_t)value;
}

/* Fill with values whose sum over ranks is exact in float, and count wrong results. */
static void Fill(float* buf, size_t n, int rank) {
  for (size_t i = 0; i < n; ++i) buf[i] = (float)((i + (size_t)rank) % 64);
}

static long CountWrong(const float* buf, size_t n) {
  long wrong = 0;
  for (size_t i = 0; i < n; ++i) {
    float expect = 0;
    for (int r = 0; r < g_size; ++r) expect += (float)((i + (size_t)r) % 64);
    wrong += buf[i] != expect;
  }
  return wrong;
}

int main(int argc, char** argv) {
  /* -t: MPI_THREAD_MULTIPLE, as mpi4py asks for (a comparison; the default is plain MPI_Init) */
  int multiple = 0;
  for (int a = 1; a < argc; ++a) multiple |= strcmp(argv[a], "-t") == 0;
  if (multiple) {
    int provided;
    MPI_Init_thread(&argc, &argv, MPI_THREAD_MULTIPLE, &provided);
  } else {
    MPI_Init(&argc, &argv);
  }
  MPI_Comm_rank(MPI_COMM_WORLD, &g_rank);
  MPI_Comm_size(MPI_COMM_WORLD, &g_size);
  size_t min_bytes = 4, max_bytes = (size_t)64 << 20;
  int iters = 1000, warmup = 100, check = 0, full = 0;
  for (int a = 1; a < argc; ++a) {
    if (strcmp(argv[a], "-m") == 0 && a + 1 < argc) {
      char* colon = strchr(argv[++a], ':');
      if (!colon) Usage();
      *colon = '\0';
      min_bytes = ParseSize(argv[a]);
      max_bytes = ParseSize(colon + 1);
    } else if (strcmp(argv[a], "-i") == 0 && a + 1 < argc) {
      iters = atoi(argv[++a]);
    } else if (strcmp(argv[a], "-x") == 0 && a + 1 < argc) {
      warmup = atoi(argv[++a]);
    } else if (strcmp(argv[a], "-c") == 0) {
      check = 1;
    } else if (strcmp(argv[a], "-t") == 0) {
      /* handled above */
    } else if (strcmp(argv[a], "-f") == 0) {
      full = 1;
    } else {
      Usage();
    }
  }
  if (min_bytes < sizeof(float)) min_bytes = sizeof(float);
  if (iters < 1 || warmup < 0 || max_bytes < min_bytes) Usage();

  float* send = malloc(max_bytes);
  float* recv = malloc(max_bytes);
  if (!send || !recv) MPI_Abort(MPI_COMM_WORLD, 1);
  memset(recv, 0, max_bytes);
  if (g_rank == 0) {
    printf("# MPI_Allreduce latency, MPI_FLOAT MPI_SUM, %d ranks, %s%s\n", g_size,
           multiple ? "MPI_THREAD_MULTIPLE" : "MPI_Init", check ? ", validated" : "");
    printf("%-12s %14s%s%s\n", "# Size", "Avg Latency(us)", full ? "  Min Latency(us)  Max Latency(us)" : "",
           check ? "  Validation" : "");
  }
  for (size_t bytes = min_bytes; bytes <= max_bytes; bytes *= 2) {
    size_t count = bytes / sizeof(float);
    /* Above 1 MiB, a tenth of the iterations: each call takes long enough to time. */
    int n_iters = bytes > (1u << 20) ? (iters + 9) / 10 : iters;
    int n_warmup = bytes > (1u << 20) ? (warmup + 9) / 10 : warmup;
    Fill(send, count, g_rank);
    for (int i = 0; i < n_warmup; ++i) MPI_Allreduce(send, recv, (int)count, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
    MPI_Barrier(MPI_COMM_WORLD);
    double elapsed = 0;
    long wrong = 0;
    for (int i = 0; i < n_iters; ++i) {
      double start = MPI_Wtime();
      MPI_Allreduce(send, recv, (int)count, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
      elapsed += MPI_Wtime() - start;
      if (check && i == n_iters - 1) wrong = CountWrong(recv, count);
    }
    double mean_us = elapsed * 1e6 / n_iters, sum_us = 0, min_us = 0, max_us = 0;
    long all_wrong = 0;
    /* The statistics travel through MPI_Reduce: never through the call being measured. */
    MPI_Reduce(&mean_us, &sum_us, 1, MPI_DOUBLE, MPI_SUM, 0, MPI_COMM_WORLD);
    MPI_Reduce(&mean_us, &min_us, 1, MPI_DOUBLE, MPI_MIN, 0, MPI_COMM_WORLD);
    MPI_Reduce(&mean_us, &max_us, 1, MPI_DOUBLE, MPI_MAX, 0, MPI_COMM_WORLD);
    MPI_Reduce(&wrong, &all_wrong, 1, MPI_LONG, MPI_SUM, 0, MPI_COMM_WORLD);
    if (g_rank == 0) {
      printf("%-12zu %14.2f", bytes, sum_us / g_size);
      if (full) printf("  %15.2f  %15.2f", min_us, max_us);
      if (check) printf("  %s", all_wrong ? "FAIL" : "Pass");
      printf("\n");
      fflush(stdout);
    }
    if (all_wrong) {
      MPI_Finalize();
      return 1;
    }
    MPI_Barrier(MPI_COMM_WORLD);
  }
  free(send);
  free(recv);
  MPI_Finalize();
  return 0;
}
