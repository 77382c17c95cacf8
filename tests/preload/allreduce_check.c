/* An unchanged MPI program for the MPI_Allreduce interposer's tests (tests/test_preload_mpi.py).
 *
 *   allreduce_check engine [quick]  every datatype x op x size the engine runs, in place and not,
 *                                on MPI_COMM_WORLD, a duplicate and two splits (quick: fewer)
 *   allreduce_check passthrough  calls the engine must leave to MPI: logical and bitwise ops,
 *                                MINLOC/MAXLOC, a user-defined op, derived datatypes, an
 *                                intercommunicator
 *   allreduce_check mismatch     ranks disagree on the count (erroneous MPI): expects an error code
 *                                through MPI_ERRORS_RETURN (run only under the interposer)
 *   allreduce_check erroneous    every rank makes the same erroneous call (a null buffer, aliased
 *                                buffers): prints the error class MPI_ERRORS_RETURN gives
 *
 * Every result is checked against values computed here, the ranks of a communicator must get the
 * same bits, and rank 0 prints one "case <name> @<group> <hash>" line per call and communicator
 * so that runs with and without the interposer can be compared line for line. Exits non-zero on
 * any wrong value.
 * Uses MPI_Init: the interposer must work at MPI_THREAD_SINGLE.
 */
#include <dlfcn.h>
#include <mpi.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int g_rank, g_size;

static uint64_t Hash(const void* data, size_t bytes) {
  const unsigned char* p = (const unsigned char*)data;
  uint64_t h = 1469598103934665603ull; /* FNV-1a */
  for (size_t i = 0; i < bytes; ++i) h = (h ^ p[i]) * 1099511628211ull;
  return h;
}

/* Each call's outcome, kept until Summarise() gathers them all in one collective (oversubscribed
   MPICH takes milliseconds per collective; a round per call would dominate the run). */
typedef struct {
  char name[96];
  uint64_t hash, group, wrong; /* group: MPI_COMM_WORLD rank of the communicator's rank 0 */
} Outcome;
static Outcome* g_outcomes;
static size_t g_count, g_capacity;

static int GroupOf(MPI_Comm comm) {
  int root = g_rank;
  MPI_Bcast(&root, 1, MPI_INT, 0, comm);
  return root;
}

static void Record(const char* name, const void* data, size_t bytes, int group, int wrong) {
  if (g_count == g_capacity) {
    g_capacity = g_capacity ? 2 * g_capacity : 256;
    g_outcomes = realloc(g_outcomes, g_capacity * sizeof(Outcome));
  }
  Outcome* o = &g_outcomes[g_count++];
  snprintf(o->name, sizeof o->name, "%s", name);
  o->hash = Hash(data, bytes);
  o->group = (uint64_t)group;
  o->wrong = (uint64_t)wrong;
}

/* Rank 0 prints "case <name> @<group> <hash>" once per group, flagging wrong values and ranks of
   one communicator whose bits differ. Returns non-zero (on every rank) if anything failed. */
static int Summarise(void) {
  size_t n = g_count;
  uint64_t* mine = malloc((3 * n + 1) * sizeof(uint64_t));
  uint64_t* all = g_rank == 0 ? malloc((3 * n + 1) * g_size * sizeof(uint64_t)) : NULL;
  for (size_t c = 0; c < n; ++c) {
    mine[3 * c] = g_outcomes[c].hash;
    mine[3 * c + 1] = g_outcomes[c].group;
    mine[3 * c + 2] = g_outcomes[c].wrong;
  }
  MPI_Gather(mine, (int)(3 * n), MPI_UINT64_T, all, (int)(3 * n), MPI_UINT64_T, 0, MPI_COMM_WORLD);
  int failed = 0;
  if (g_rank == 0) {
    for (size_t c = 0; c < n; ++c) {
      for (int group = 0; group < g_size; ++group) {
        int members = 0, wrong = 0, differ = 0;
        uint64_t first = 0;
        for (int r = 0; r < g_size; ++r) {
          const uint64_t* o = all + (size_t)r * 3 * n + 3 * c;
          if (o[1] != (uint64_t)group) continue;
          if (members++ == 0) first = o[0];
          differ |= o[0] != first;
          wrong |= o[2] != 0;
        }
        if (!members) continue;
        printf("case %s @%d %016llx%s%s\n", g_outcomes[c].name, group, (unsigned long long)first, wrong ? " WRONG" : "",
               differ ? " RANKS-DIFFER" : "");
        failed |= wrong || differ;
      }
    }
  }
  MPI_Bcast(&failed, 1, MPI_INT, 0, MPI_COMM_WORLD);
  free(mine);
  free(all);
  return failed;
}

/* ---- engine cases ------------------------------------------------------------------------- */

enum Kind { kSigned, kUnsigned, kFloat };

typedef struct {
  MPI_Datatype type;
  const char* name;
  size_t size;
  enum Kind kind;
} TypeCase;

/* Inputs small enough that no sum or product overflows any type and every float result is
   exact (halves of small integers), so that any correct reduction order gives the same bits. */
static double Input(size_t i, int rank, MPI_Op op, enum Kind kind) {
  long v;
  if (op == MPI_PROD) {
    v = kind == kUnsigned ? (long)((i + rank) % 3 + 1) : (long)((i + rank) % 5) - 2;
  } else {
    v = (long)((i * 7 + (size_t)rank * 13) % 21) - (kind == kUnsigned ? 0 : 10);
  }
  return kind == kFloat ? (double)v * 0.5 : (double)v;
}

static double Combine(double a, double b, MPI_Op op) {
  if (op == MPI_SUM) return a + b;
  if (op == MPI_PROD) return a * b;
  if (op == MPI_MIN) return a < b ? a : b;
  return a > b ? a : b;
}

static void Store(void* buf, size_t i, double v, const TypeCase* t) {
  char* p = (char*)buf + i * t->size;
  if (t->kind == kFloat) {
    if (t->size == 4) {
      float f = (float)v;
      memcpy(p, &f, 4);
    } else {
      memcpy(p, &v, 8);
    }
  } else {
    int64_t x = (int64_t)v; /* little-endian: the low bytes are the narrower integer */
    memcpy(p, &x, t->size);
  }
}

static int CheckOne(const char* name, MPI_Comm comm, int group, const TypeCase* t, MPI_Op op, size_t count,
                    int in_place) {
  int rank, size;
  MPI_Comm_rank(comm, &rank);
  MPI_Comm_size(comm, &size);
  size_t bytes = count * t->size;
  char* send = malloc(bytes + 1);
  char* recv = malloc(bytes + 1);
  char* expect = malloc(bytes + 1);
  for (size_t i = 0; i < count; ++i) {
    double acc = Input(i, 0, op, t->kind);
    for (int r = 1; r < size; ++r) acc = Combine(acc, Input(i, r, op, t->kind), op);
    Store(send, i, Input(i, rank, op, t->kind), t);
    Store(expect, i, acc, t);
  }
  uint64_t send_hash = Hash(send, bytes);
  int rc;
  if (in_place) {
    memcpy(recv, send, bytes);
    rc = MPI_Allreduce(MPI_IN_PLACE, recv, (int)count, t->type, op, comm);
  } else {
    memset(recv, 0x5a, bytes);
    rc = MPI_Allreduce(send, recv, (int)count, t->type, op, comm);
  }
  int wrong = rc != MPI_SUCCESS || memcmp(recv, expect, bytes) != 0 || Hash(send, bytes) != send_hash;
  if (wrong) fprintf(stderr, "rank %d: %s wrong (rc %d)\n", g_rank, name, rc);
  Record(name, recv, bytes, group, wrong);
  free(send);
  free(recv);
  free(expect);
  return wrong;
}

/* quick: fewer types and sizes, for rank counts where oversubscribed MPICH is slow. */
static void EngineCases(int quick) {
  const TypeCase types[] = {
      {MPI_INT, "int", 4, kSigned},
      {MPI_INT32_T, "int32_t", 4, kSigned},
      {MPI_UNSIGNED, "unsigned", 4, kUnsigned},
      {MPI_LONG, "long", sizeof(long), kSigned},
      {MPI_INT64_T, "int64_t", 8, kSigned},
      {MPI_UINT64_T, "uint64_t", 8, kUnsigned},
      {MPI_SIGNED_CHAR, "signed_char", 1, kSigned},
      {MPI_UINT8_T, "uint8_t", 1, kUnsigned},
      {MPI_FLOAT, "float", 4, kFloat},
      {MPI_DOUBLE, "double", 8, kFloat},
  };
  const MPI_Op ops[] = {MPI_SUM, MPI_PROD, MPI_MIN, MPI_MAX};
  const char* op_names[] = {"sum", "prod", "min", "max"};
  MPI_Comm dup, halves, reversed;
  MPI_Comm_dup(MPI_COMM_WORLD, &dup);
  MPI_Comm_split(MPI_COMM_WORLD, g_rank % 2, g_rank, &halves);
  MPI_Comm_split(MPI_COMM_WORLD, 0, -g_rank, &reversed); /* every rank, in reverse order */
  const MPI_Comm comms[] = {MPI_COMM_WORLD, dup, halves, reversed};
  const char* comm_names[] = {"world", "dup", "split", "reversed"};
  int groups[4];
  for (int c = 0; c < 4; ++c) groups[c] = GroupOf(comms[c]);
  char name[160];
  for (int c = 0; c < 4; ++c) {
    for (size_t t = 0; t < sizeof types / sizeof types[0]; ++t) {
      if (quick && t % 2 == 1) continue;
      /* 0, 1, odd, a few pages, and over 1 MiB */
      const size_t counts[] = {0, 1, 7, 1001, (size_t)(1 << 20) / types[t].size + 12345};
      for (int o = 0; o < 4; ++o) {
        for (int n = 0; n < 5; ++n) {
          /* Over 1 MiB: every type and op on MPI_COMM_WORLD, int and float on the reversed split. */
          if (n == 4 && c != 0 && !(c == 3 && (types[t].type == MPI_INT || types[t].type == MPI_FLOAT))) continue;
          if (quick && (n == 3 || (n == 4 && o != 0))) continue;
          for (int in_place = 0; in_place < 2; ++in_place) {
            snprintf(name, sizeof name, "%s/%s/%s/n=%zu/%s", comm_names[c], types[t].name, op_names[o], counts[n],
                     in_place ? "inplace" : "copy");
            CheckOne(name, comms[c], groups[c], &types[t], ops[o], counts[n], in_place);
          }
        }
      }
    }
  }
  MPI_Comm_free(&dup);
  MPI_Comm_free(&halves);
  /* `reversed` is left for MPI_Finalize: its engine must be closed there. */
}

/* ---- pass-through cases ------------------------------------------------------------------- */

static void SumMod1000(void* in, void* inout, int* len, MPI_Datatype* type) {
  (void)type;
  for (int i = 0; i < *len; ++i) ((int*)inout)[i] = (((int*)in)[i] + ((int*)inout)[i]) % 1000;
}

static void SumTriples(void* in, void* inout, int* len, MPI_Datatype* type) {
  (void)type;
  for (int i = 0; i < 3 * *len; ++i) ((int*)inout)[i] += ((int*)in)[i];
}

static void PassThroughCases(void) {
  enum { kN = 1000 };
  int in[3 * kN], out[3 * kN], expect[3 * kN];
  int wrong;

  /* MPI_LAND and MPI_BAND on int */
  for (int i = 0; i < kN; ++i) in[i] = (i + g_rank) % 7 != 0;
  MPI_Allreduce(in, out, kN, MPI_INT, MPI_LAND, MPI_COMM_WORLD);
  wrong = 0;
  for (int i = 0; i < kN; ++i) {
    int all = 1;
    for (int r = 0; r < g_size; ++r) all = all && (i + r) % 7 != 0;
    wrong |= out[i] != all;
  }
  Record("passthrough/land", out, sizeof(int) * kN, 0, wrong);

  for (int i = 0; i < kN; ++i) in[i] = (i * 2654435761u) ^ (unsigned)g_rank;
  MPI_Allreduce(in, out, kN, MPI_UNSIGNED, MPI_BAND, MPI_COMM_WORLD);
  wrong = 0;
  for (int i = 0; i < kN; ++i) {
    unsigned all = ~0u;
    for (int r = 0; r < g_size; ++r) all &= (i * 2654435761u) ^ (unsigned)r;
    wrong |= (unsigned)out[i] != all;
  }
  Record("passthrough/band", out, sizeof(int) * kN, 0, wrong);

  /* MPI_MAXLOC on MPI_2INT: the value and the lowest rank holding it */
  struct {
    int value, rank;
  } pairs[kN], result[kN];
  for (int i = 0; i < kN; ++i) {
    pairs[i].value = (i + 3 * g_rank) % 5;
    pairs[i].rank = g_rank;
  }
  MPI_Allreduce(pairs, result, kN, MPI_2INT, MPI_MAXLOC, MPI_COMM_WORLD);
  wrong = 0;
  for (int i = 0; i < kN; ++i) {
    int best = -1, where = -1;
    for (int r = 0; r < g_size; ++r) {
      if ((i + 3 * r) % 5 > best) best = (i + 3 * r) % 5, where = r;
    }
    wrong |= result[i].value != best || result[i].rank != where;
  }
  Record("passthrough/maxloc-2int", result, sizeof result, 0, wrong);

  /* A user-defined op */
  MPI_Op mod_sum;
  MPI_Op_create(SumMod1000, 1, &mod_sum);
  for (int i = 0; i < kN; ++i) in[i] = (i * 37 + g_rank * 501) % 1000;
  MPI_Allreduce(in, out, kN, MPI_INT, mod_sum, MPI_COMM_WORLD);
  wrong = 0;
  for (int i = 0; i < kN; ++i) {
    int acc = 0;
    for (int r = 0; r < g_size; ++r) acc = (acc + (i * 37 + r * 501) % 1000) % 1000;
    wrong |= out[i] != acc;
  }
  Record("passthrough/user-op", out, sizeof(int) * kN, 0, wrong);
  MPI_Op_free(&mod_sum);

  /* A derived datatype (three ints), in place, with a user-defined sum (MPI's predefined ops take
     predefined datatypes only) */
  MPI_Datatype triple;
  MPI_Op triple_sum;
  MPI_Type_contiguous(3, MPI_INT, &triple);
  MPI_Type_commit(&triple);
  MPI_Op_create(SumTriples, 1, &triple_sum);
  for (int i = 0; i < 3 * kN; ++i) out[i] = i + g_rank;
  MPI_Allreduce(MPI_IN_PLACE, out, kN, triple, triple_sum, MPI_COMM_WORLD);
  wrong = 0;
  for (int i = 0; i < 3 * kN; ++i) {
    expect[i] = g_size * i + g_size * (g_size - 1) / 2;
    wrong |= out[i] != expect[i];
  }
  Record("passthrough/derived-type", out, sizeof(int) * 3 * kN, 0, wrong);
  MPI_Op_free(&triple_sum);
  MPI_Type_free(&triple);

  /* A type the engine does not reduce: short */
  short shorts[kN], short_out[kN];
  for (int i = 0; i < kN; ++i) shorts[i] = (short)(i - g_rank);
  MPI_Allreduce(shorts, short_out, kN, MPI_SHORT, MPI_SUM, MPI_COMM_WORLD);
  wrong = 0;
  for (int i = 0; i < kN; ++i) wrong |= short_out[i] != (short)(g_size * i - g_size * (g_size - 1) / 2);
  Record("passthrough/short", short_out, sizeof short_out, 0, wrong);

  /* An intercommunicator: even ranks and odd ranks; each side gets the other side's sum */
  if (g_size >= 2) {
    MPI_Comm side, inter;
    int color = g_rank % 2;
    MPI_Comm_split(MPI_COMM_WORLD, color, g_rank, &side);
    MPI_Intercomm_create(side, 0, MPI_COMM_WORLD, 1 - color, 99, &inter);
    int mine = g_rank + 1, sum = 0, other = 0;
    MPI_Allreduce(&mine, &sum, 1, MPI_INT, MPI_SUM, inter);
    for (int r = 0; r < g_size; ++r) other += r % 2 != color ? r + 1 : 0;
    /* The two sides hold different sums by design: one group per side. */
    Record("passthrough/intercomm", &sum, sizeof sum, color, sum != other);
    MPI_Comm_free(&inter);
    MPI_Comm_free(&side);
  }
}

/* ---- engine errors ------------------------------------------------------------------------ */

static void MismatchCase(void) {
  MPI_Comm comm;
  MPI_Comm_dup(MPI_COMM_WORLD, &comm);
  MPI_Comm_set_errhandler(comm, MPI_ERRORS_RETURN);
  int in[11] = {0}, out[11];
  int rc = MPI_Allreduce(in, out, 10 + (g_rank % 2), MPI_INT, MPI_SUM, comm);
  char text[MPI_MAX_ERROR_STRING] = "";
  int len = 0, error_class = -1;
  if (rc != MPI_SUCCESS) {
    MPI_Error_string(rc, text, &len);
    MPI_Error_class(rc, &error_class);
  }
  printf("mismatch rc=%s class=%d other=%d text=%s\n", rc == MPI_SUCCESS ? "success" : "error", error_class,
         MPI_ERR_OTHER, text);
  MPI_Comm_free(&comm);
}

/* Calls MPI refuses before any communication, made alike on every rank: the interposer must leave
 * them to MPI, so that the program gets MPI's own error (not a crash, not a silent success). */
static void ErroneousCases(void) {
  MPI_Comm comm;
  MPI_Comm_dup(MPI_COMM_WORLD, &comm);
  MPI_Comm_set_errhandler(comm, MPI_ERRORS_RETURN);
  int in[4] = {1, 2, 3, 4}, out[4];
  struct {
    const char* name;
    const void* send;
    void* recv;
  } calls[] = {{"null-send", NULL, out}, {"null-recv", in, NULL}, {"aliased", in, in}};
  for (size_t i = 0; i < sizeof calls / sizeof calls[0]; ++i) {
    int rc = MPI_Allreduce(calls[i].send, calls[i].recv, 4, MPI_INT, MPI_SUM, comm);
    int error_class = MPI_SUCCESS;
    if (rc != MPI_SUCCESS) MPI_Error_class(rc, &error_class);
    if (g_rank == 0) printf("erroneous %s class=%d\n", calls[i].name, error_class);
  }
  MPI_Comm_free(&comm);
}

int main(int argc, char** argv) {
  /* One write per line: mpirun -prepend-rank prefixes each chunk it reads. */
  setvbuf(stdout, NULL, _IOLBF, 0);
  MPI_Init(&argc, &argv);
  MPI_Comm_rank(MPI_COMM_WORLD, &g_rank);
  MPI_Comm_size(MPI_COMM_WORLD, &g_size);
  const char* mode = argc > 1 ? argv[1] : "engine";
  if (strcmp(mode, "engine") == 0) {
    EngineCases(argc > 2 && strcmp(argv[2], "quick") == 0);
  } else if (strcmp(mode, "passthrough") == 0) {
    PassThroughCases();
  } else if (strcmp(mode, "mismatch") == 0) {
    MismatchCase();
  } else if (strcmp(mode, "erroneous") == 0) {
    ErroneousCases();
  } else {
    if (g_rank == 0) fprintf(stderr, "unknown mode %s\n", mode);
    MPI_Abort(MPI_COMM_WORLD, 2);
  }
  /* Present only when the interposer is preloaded. */
  void (*stats)(unsigned long long*, unsigned long long*) =
      (void (*)(unsigned long long*, unsigned long long*))dlsym(RTLD_DEFAULT, "pycomm_preload_stats");
  if (stats) {
    unsigned long long engine = 0, passed = 0;
    stats(&engine, &passed);
    printf("stats rank %d engine %llu passthrough %llu\n", g_rank, engine, passed);
  } else {
    printf("stats rank %d no-preload\n", g_rank);
  }
  int failed = Summarise();
  MPI_Finalize();
  return failed ? 1 : 0;
}
