#include "tests/support/raw_session.h"

#include <gtest/gtest.h>

#include <chrono>

namespace pollen::testing {

std::unique_ptr<RawSession> OpenRawSession(const std::string& address,
                                           const std::string& model_id,
                                           const std::string& id, int start,
                                           int end, int max_length) {
  auto session = std::make_unique<RawSession>();
  session->id = id;
  session->stub = v1::BlockService::NewStub(
      grpc::CreateChannel(address, grpc::InsecureChannelCredentials()));
  session->context.set_deadline(std::chrono::system_clock::now() +
                                std::chrono::seconds(60));
  session->stream = session->stub->Inference(&session->context);

  v1::InferenceRequest request;
  v1::InferenceOpen* open = request.mutable_open();
  open->set_model_id(model_id);
  open->mutable_blocks()->set_start(start);
  open->mutable_blocks()->set_end(end);
  open->set_max_length(max_length);
  open->set_session_id(id);
  v1::InferenceResponse response;
  EXPECT_TRUE(session->stream->Write(request)) << id;
  EXPECT_TRUE(session->stream->Read(&response)) << id;
  return session;
}

}  // namespace pollen::testing
