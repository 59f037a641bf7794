#include "node/block_service.h"

#include "node/block_span.h"
#include "node/inference_reactor.h"
#include "node/session_manager.h"

namespace pollen::node {

const char* PollenVersion() { return "0.1.0"; }

grpc::ServerBidiReactor<v1::InferenceRequest, v1::InferenceResponse>*
BlockServiceImpl::Inference(grpc::CallbackServerContext* call) {
  // The reactor deletes itself in OnDone.
  return new InferenceReactor(context_, call->peer());
}

grpc::ServerUnaryReactor* BlockServiceImpl::Info(
    grpc::CallbackServerContext* call, const v1::InfoRequest* /*request*/,
    v1::InfoResponse* response) {
  response->set_version(PollenVersion());
  response->set_node_id(context_->node_id);
  response->set_public_name(context_->public_name);

  v1::ServedSpan* served = response->add_spans();
  served->set_model_id(context_->model_id);
  served->mutable_blocks()->set_start(context_->span->start());
  served->mutable_blocks()->set_end(context_->span->end());

  response->set_cache_tokens_left(context_->sessions->cache_tokens_left());
  response->set_cache_tokens_total(context_->sessions->cache_tokens_total());
  response->set_open_sessions(context_->sessions->open_sessions());

  grpc::ServerUnaryReactor* reactor = call->DefaultReactor();
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

}  // namespace pollen::node
