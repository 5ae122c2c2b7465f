using LinearAlgebra
A = [2.0 1.0; 1.0 3.0]
println("eigenvalues: ", round.(eigvals(A); digits=3))
println("depot: ", join(DEPOT_PATH, ":"))
