"""A training log as Caffe 1.0 writes it, for the log reader, the curves and the HTML report."""

# Lines as Caffe 1.0 prints them (solver.cpp / sgd_solver.cpp), with a resume appended at the end
# that repeats iteration 200 and goes on.
CAFFE_LOG = """\
I1231 23:59:58.000000 25210 caffe.cpp:218] Using GPUs 0
I1231 23:59:59.000000 25210 solver.cpp:44] Initializing solver from parameters:
test_iter: 10
I1231 23:59:59.500000 25210 solver.cpp:288] Solving AlexNet
I1231 23:59:59.600000 25210 solver.cpp:347] Iteration 0, Testing net (#0)
I1231 23:59:59.700000 25210 solver.cpp:414]     Test net output #0: accuracy = 0.33
I1231 23:59:59.700001 25210 solver.cpp:414]     Test net output #1: loss = 1.0986 (* 1 = 1.0986 loss)
I1231 23:59:59.800000 25210 solver.cpp:228] Iteration 0, loss = 1.1
I1231 23:59:59.800001 25210 solver.cpp:244]     Train net output #0: loss = 1.1 (* 1 = 1.1 loss)
I1231 23:59:59.800002 25210 sgd_solver.cpp:106] Iteration 0, lr = 0.01
I0101 00:00:09.800000 25210 solver.cpp:228] Iteration 100, loss = 0.7
I0101 00:00:09.800001 25210 solver.cpp:244]     Train net output #0: loss = 0.65 (* 1 = 0.65 loss)
I0101 00:00:09.800002 25210 sgd_solver.cpp:106] Iteration 100, lr = 0.001
I0101 00:00:19.600000 25210 solver.cpp:347] Iteration 200, Testing net (#0)
I0101 00:00:19.700000 25210 solver.cpp:414]     Test net output #0: accuracy = 0.5
I0101 00:00:19.700001 25210 solver.cpp:414]     Test net output #1: loss = 0.9 (* 1 = 0.9 loss)
I0101 00:00:19.800000 25210 solver.cpp:228] Iteration 200, loss = 0.5
I0101 00:00:19.800001 25210 solver.cpp:244]     Train net output #0: loss = 0.45 (* 1 = 0.45 loss)
I0101 00:00:19.800002 25210 sgd_solver.cpp:106] Iteration 200, lr = 0.0001
I0101 00:01:00.000000 31000 sgd_solver.cpp:318] Resuming from 1_iter_200.solverstate
I0101 00:01:00.100000 31000 solver.cpp:288] Solving AlexNet
I0101 00:01:00.200000 31000 solver.cpp:347] Iteration 200, Testing net (#0)
I0101 00:01:00.300000 31000 solver.cpp:414]     Test net output #0: accuracy = 0.75
I0101 00:01:00.300001 31000 solver.cpp:414]     Test net output #1: loss = 0.6 (* 1 = 0.6 loss)
I0101 00:01:10.000000 31000 solver.cpp:228] Iteration 300, loss = 0.3
I0101 00:01:10.000001 31000 solver.cpp:244]     Train net output #0: loss = 0.25 (* 1 = 0.25 loss)
I0101 00:01:10.000002 31000 sgd_solver.cpp:106] Iteration 300, lr = 1e-05
I0101 00:01:10.500000 31000 solver.cpp:326] Optimization Done.
"""

