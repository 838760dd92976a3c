/* lymph_cv.net.maxpool16: max(0, max pooling) over int16 values in N×H×W×C (channels-last) order.
 *
 * relu_maxpool(src, dst, n, h, w, c, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, out_h,
 * out_w, threads) writes dst[b, y, x, :] = max(0, max of src over the window's rows and columns
 * inside the image): a pooling pad acts as minus infinity, and Caffe's rounded-up last window
 * is cut at the border, as torch's and Caffe's MAX pooling do.  lymph_cv.net.bf16 passes the bit
 * patterns of bfloat16 blobs here: read as int16 they order as their values once the negatives
 * are floored to 0, so this is exactly relu(maxpool(x)) of the tutorial net's pool1 + relu1,
 * without the int64 indices torch's CPU max pooling always writes.  Threads split the images.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <pthread.h>
#include <stdint.h>
#include <string.h>

#define MAX_THREADS 8

typedef struct {
    const int16_t *src;
    int16_t *dst;
    Py_ssize_t first, last; /* images [first, last) */
    Py_ssize_t h, w, c, kh, kw, sh, sw, ph, pw, oh, ow;
} Job;

/* One output pixel's C channels: the floor 0, then the maxima of the window's pixels. */
__attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
static void pool_image(const int16_t *restrict image, int16_t *restrict out, const Job *job) {
    const Py_ssize_t c = job->c;
    for (Py_ssize_t y = 0; y < job->oh; y++) {
        Py_ssize_t top = y * job->sh - job->ph, bottom = top + job->kh;
        if (top < 0) top = 0;
        if (bottom > job->h) bottom = job->h;
        for (Py_ssize_t x = 0; x < job->ow; x++) {
            Py_ssize_t left = x * job->sw - job->pw, right = left + job->kw;
            if (left < 0) left = 0;
            if (right > job->w) right = job->w;
            int16_t *restrict acc = out + (y * job->ow + x) * c;
            memset(acc, 0, (size_t)c * sizeof(int16_t));
            for (Py_ssize_t row = top; row < bottom; row++) {
                const int16_t *restrict pixel = image + (row * job->w + left) * c;
                for (Py_ssize_t col = left; col < right; col++, pixel += c)
                    for (Py_ssize_t k = 0; k < c; k++)
                        acc[k] = pixel[k] > acc[k] ? pixel[k] : acc[k];
            }
        }
    }
}

static void *run_job(void *arg) {
    const Job *job = arg;
    for (Py_ssize_t b = job->first; b < job->last; b++)
        pool_image(job->src + b * job->h * job->w * job->c, job->dst + b * job->oh * job->ow * job->c, job);
    return NULL;
}

static PyObject *relu_maxpool(PyObject *self, PyObject *args) {
    Py_buffer src, dst;
    Py_ssize_t n, h, w, c, kh, kw, sh, sw, ph, pw, oh, ow;
    int threads;
    if (!PyArg_ParseTuple(args, "y*w*nnnnnnnnnnnni", &src, &dst, &n, &h, &w, &c, &kh, &kw, &sh, &sw, &ph, &pw,
                          &oh, &ow, &threads))
        return NULL;
    PyObject *result = NULL;
    if (n < 0 || h < 1 || w < 1 || c < 1 || kh < 1 || kw < 1 || sh < 1 || sw < 1 || ph < 0 || pw < 0 || oh < 1 || ow < 1) {
        PyErr_SetString(PyExc_ValueError, "relu_maxpool: sizes must be positive (pads and n non-negative)");
        goto done;
    }
    if (src.len != n * h * w * c * (Py_ssize_t)sizeof(int16_t) || dst.len != n * oh * ow * c * (Py_ssize_t)sizeof(int16_t)) {
        PyErr_SetString(PyExc_ValueError, "relu_maxpool: buffer sizes do not match the shapes");
        goto done;
    }
    if ((oh - 1) * sh - ph >= h || (ow - 1) * sw - pw >= w) {
        PyErr_SetString(PyExc_ValueError, "relu_maxpool: the last window starts outside the image");
        goto done;
    }
    if (threads < 1) threads = 1;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads > n) threads = n > 0 ? (int)n : 1;
    Job jobs[MAX_THREADS];
    pthread_t ids[MAX_THREADS];
    int running[MAX_THREADS] = {0};
    Py_BEGIN_ALLOW_THREADS
    for (int t = 0; t < threads; t++)
        jobs[t] = (Job){src.buf, dst.buf, n * t / threads, n * (t + 1) / threads, h, w, c, kh, kw, sh, sw, ph, pw, oh, ow};
    for (int t = 1; t < threads; t++)
        running[t] = pthread_create(&ids[t], NULL, run_job, &jobs[t]) == 0;
    run_job(&jobs[0]);
    for (int t = 1; t < threads; t++) {
        if (running[t])
            pthread_join(ids[t], NULL);
        else
            run_job(&jobs[t]); /* no thread: this one does that share too */
    }
    Py_END_ALLOW_THREADS
    result = Py_None;
    Py_INCREF(result);
done:
    PyBuffer_Release(&src);
    PyBuffer_Release(&dst);
    return result;
}

static PyMethodDef methods[] = {
    {"relu_maxpool", relu_maxpool, METH_VARARGS,
     "relu_maxpool(src, dst, n, h, w, c, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, out_h, out_w, threads):\n"
     "dst (n, out_h, out_w, c) int16 = max(0, max pooling of src (n, h, w, c) int16)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "maxpool16", "max(0, max pooling) of int16 NHWC data.", -1, methods};

PyMODINIT_FUNC PyInit_maxpool16(void) { return PyModule_Create(&module); }
