/* MPI hello: rank, size, processor name and the MPI library version (shows which MPI was loaded). */
#include <mpi.h>
#include <stdio.h>

int main(int argc, char **argv) {
    int rank, size, len, vlen;
    char name[MPI_MAX_PROCESSOR_NAME], version[MPI_MAX_LIBRARY_VERSION_STRING];
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    MPI_Get_processor_name(name, &len);
    MPI_Get_library_version(version, &vlen);
    printf("hello from rank %d of %d on %s\n", rank, size, name);
    if (rank == 0)
        printf("MPI library: %.60s\n", version);
    MPI_Finalize();
    return 0;
}
