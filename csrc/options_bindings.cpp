// The typed boundary of the merge kernels: the Kernel enum and one option struct per method
// family, exposed as Python classes (a misspelt field is an AttributeError in Python, never a
// string the core has to parse). Registered into isofast._core by register_options().
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "methods/merge.hpp"

namespace py = pybind11;
using namespace isofast;

void register_options(py::module_& m) {
  py::enum_<Kernel>(m, "Kernel", "The merge kernels of the core.")
      .value("mean", Kernel::Mean)
      .value("sum", Kernel::Sum)
      .value("ties", Kernel::Ties)
      .value("consensus", Kernel::Consensus)
      .value("gta", Kernel::Gta)
      .value("tsv_m", Kernel::TsvM)
      .value("iso_c", Kernel::IsoC)
      .value("iso_cts", Kernel::IsoCts)
      .value("slerp", Kernel::Slerp)
      .value("model_stock", Kernel::ModelStock)
      .value("nuslerp", Kernel::Nuslerp)
      .value("multislerp", Kernel::Multislerp)
      .value("karcher", Kernel::Karcher)
      .value("sce", Kernel::Sce);
  py::enum_<MatrixRoute>(m, "MatrixRoute",
                         "gram: float64 Gram eigenpairs (float32's route); direct: SVDs.")
      .value("auto", MatrixRoute::Auto)
      .value("gram", MatrixRoute::Gram)
      .value("direct", MatrixRoute::Direct);

  py::class_<DareOptions>(m, "DareOptions")
      .def(py::init<>())
      .def_readwrite("drop_rate", &DareOptions::drop_rate)
      .def_readwrite("seed", &DareOptions::seed);
  py::class_<TiesOptions>(m, "TiesOptions")
      .def(py::init<>())
      .def_readwrite("density", &TiesOptions::density)
      .def_readwrite("trim_global", &TiesOptions::trim_global)
      .def_readwrite("thresholds", &TiesOptions::thresholds)
      .def_readwrite("majority_sign", &TiesOptions::majority_sign)
      .def_readwrite("sum", &TiesOptions::sum);
  py::class_<ConsensusOptions>(m, "ConsensusOptions")
      .def(py::init<>())
      .def_readwrite("lam", &ConsensusOptions::lam)
      .def_readwrite("min_agree", &ConsensusOptions::min_agree)
      .def_readwrite("on_ties", &ConsensusOptions::on_ties);
  py::enum_<Sparsify>(m, "Sparsify", "mergekit's sparsification of each task vector.")
      .value("none", Sparsify::None)
      .value("magnitude", Sparsify::Magnitude)
      .value("random", Sparsify::Random)
      .value("magnitude_outliers", Sparsify::MagnitudeOutliers)
      .value("della_magprune", Sparsify::DellaMagprune);
  py::enum_<Elect>(m, "Elect", "Sign election: none, sign of the sum, or of the sum of signs.")
      .value("none", Elect::None)
      .value("sum", Elect::Sum)
      .value("count", Elect::Count);
  py::class_<GtaOptions>(m, "GtaOptions")
      .def(py::init<>())
      .def_readwrite("sparsify", &GtaOptions::sparsify)
      .def_readwrite("elect", &GtaOptions::elect)
      .def_readwrite("weights", &GtaOptions::weights)
      .def_readwrite("densities", &GtaOptions::densities)
      .def_readwrite("gammas", &GtaOptions::gammas)
      .def_readwrite("epsilons", &GtaOptions::epsilons)
      .def_readwrite("rescale", &GtaOptions::rescale)
      .def_readwrite("normalize", &GtaOptions::normalize)
      .def_readwrite("lam", &GtaOptions::lambda);
  py::class_<SlerpOptions>(m, "SlerpOptions")
      .def(py::init<>())
      .def_readwrite("t", &SlerpOptions::t)
      .def_readwrite("dot_threshold", &SlerpOptions::dot_threshold)
      .def_readwrite("eps", &SlerpOptions::eps);
  py::class_<ModelStockOptions>(m, "ModelStockOptions")
      .def(py::init<>())
      .def_readwrite("filter_wise", &ModelStockOptions::filter_wise);
  py::class_<NuslerpOptions>(m, "NuslerpOptions")
      .def(py::init<>())
      .def_readwrite("weights", &NuslerpOptions::weights)
      .def_readwrite("row_wise", &NuslerpOptions::row_wise)
      .def_readwrite("flatten", &NuslerpOptions::flatten)
      .def_readwrite("eps", &NuslerpOptions::eps);
  py::class_<MultislerpOptions>(m, "MultislerpOptions")
      .def(py::init<>())
      .def_readwrite("weights", &MultislerpOptions::weights)
      .def_readwrite("normalize_weights", &MultislerpOptions::normalize_weights)
      .def_readwrite("eps", &MultislerpOptions::eps);
  py::class_<KarcherOptions>(m, "KarcherOptions")
      .def(py::init<>())
      .def_readwrite("max_iter", &KarcherOptions::max_iter)
      .def_readwrite("tol", &KarcherOptions::tol);
  py::class_<SceOptions>(m, "SceOptions")
      .def(py::init<>())
      .def_readwrite("select_topk", &SceOptions::select_topk);
  py::class_<MatrixOptions>(m, "MatrixOptions")
      .def(py::init<>())
      .def_readwrite("rank_tol", &MatrixOptions::rank_tol)
      .def_readwrite("common_space_fraction", &MatrixOptions::common_space_fraction)
      .def_readwrite("route", &MatrixOptions::route);
  py::class_<MergeOptions>(m, "MergeOptions", "Everything one merge call needs besides its items.")
      .def(py::init<>())
      .def(py::init<const MergeOptions&>(), "A copy.")
      .def_readwrite("kernel", &MergeOptions::kernel)
      .def_readwrite("alpha", &MergeOptions::alpha)
      .def_readwrite("compute64", &MergeOptions::compute64)
      .def_readwrite("threads", &MergeOptions::threads)
      .def_readwrite("item_threads", &MergeOptions::item_threads)
      .def_readwrite("dare", &MergeOptions::dare)
      .def_readwrite("ties", &MergeOptions::ties)
      .def_readwrite("consensus", &MergeOptions::consensus)
      .def_readwrite("gta", &MergeOptions::gta)
      .def_readwrite("slerp", &MergeOptions::slerp)
      .def_readwrite("model_stock", &MergeOptions::model_stock)
      .def_readwrite("nuslerp", &MergeOptions::nuslerp)
      .def_readwrite("multislerp", &MergeOptions::multislerp)
      .def_readwrite("karcher", &MergeOptions::karcher)
      .def_readwrite("sce", &MergeOptions::sce)
      .def_readwrite("matrix", &MergeOptions::matrix)
      .def_readwrite("release_inputs", &MergeOptions::release_inputs);
}
