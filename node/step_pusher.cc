#include "node/step_pusher.h"

#include <chrono>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "common/status_util.h"

namespace pollen::node {
namespace {

// One Push call in flight; deleted by its completion callback.
struct PushCall {
  std::unique_ptr<v1::BlockService::Stub> stub;
  grpc::ClientContext context;
  std::unique_ptr<v1::PushRequest> request;
  v1::PushResponse response;
  std::function<void(absl::Status)> done;
};

}  // namespace

absl::Status ValidatePushTarget(const v1::PushTarget& target,
                                size_t max_session_id_length) {
  const std::string& address = target.address();
  if (address.empty() || address.size() > kMaxPushAddressLength ||
      !absl::StrContains(address, ':')) {
    return absl::InvalidArgumentError(absl::StrCat(
        "push_to.address must be host:port of at most ", kMaxPushAddressLength,
        " characters, got '", address.substr(0, kMaxPushAddressLength), "' (",
        address.size(), " characters)"));
  }
  if (target.session_id().empty() ||
      target.session_id().size() > max_session_id_length) {
    return absl::InvalidArgumentError(absl::StrCat(
        "push_to.session_id must have 1 to ", max_session_id_length,
        " characters, got ", target.session_id().size()));
  }
  return absl::OkStatus();
}

void StepPusher::Push(const std::string& address,
                      std::unique_ptr<v1::PushRequest> request,
                      std::function<void(absl::Status)> done) {
  auto* call = new PushCall;
  call->stub = v1::BlockService::NewStub(channels_.Get(address));
  call->context.set_deadline(std::chrono::system_clock::now() +
                             absl::ToChronoMilliseconds(kPushTimeout));
  call->request = std::move(request);
  call->done = std::move(done);
  call->stub->async()->Push(
      &call->context, call->request.get(), &call->response,
      [call, address](grpc::Status status) {
        absl::Status result = FromGrpcStatus(status);
        if (!result.ok()) {
          result = absl::Status(result.code(),
                                absl::StrCat("push to ", address, ": ",
                                             result.message()));
        }
        call->done(std::move(result));
        delete call;
      });
}

}  // namespace pollen::node
